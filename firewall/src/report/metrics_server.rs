//! The HTTP side of `firewall run --metrics ADDR`: `GET /metrics` and the probes `/healthz`
//! and `/readyz`, served by hyper on the daemon's own runtime, bounded so that idle or slow
//! clients can neither lock scrapes out nor stall the daemon's event loop.
//!
//! Each connection serves one request and closes (no keep-alive: a scrape every few seconds
//! gains nothing from one, and a connection is then either waiting for its request head or
//! being answered). At most [`MAX_CONNECTIONS`] are held; when a new one arrives beyond that,
//! the one that has waited longest without sending its request head is closed to make room,
//! so a crowd of idle connections delays a scrape by nothing. A request head must arrive
//! within [`HEAD_TIMEOUT`], and the whole exchange ends by [`REQUEST_DEADLINE`]. The page is
//! rendered on a blocking thread (counting a full flow table alone takes about 0.2 s), at
//! most [`MAX_RENDERS`] at a time.
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::warn;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::dataplane::pins::Pins;
use crate::report::metrics::{render, SharedReloads};

/// Connections held at once.
pub const MAX_CONNECTIONS: usize = 64;
/// The request head must have arrived this long after the connection was accepted.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Head, rendering and response must be done this long after the connection was accepted.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// Pages rendered at once, each on a thread of the runtime's blocking pool. One: a render of
/// a full flow table keeps a core busy for 0.2 s, and the event loop needs one too.
pub const MAX_RENDERS: usize = 1;
/// hyper's smallest read buffer limit: a request head beyond it is refused.
const MAX_HEAD_BYTES: usize = 8 * 1024;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` and serves `GET /metrics` there from a task on the current tokio runtime.
pub fn serve(addr: SocketAddr, pins: Pins, reloads: SharedReloads) -> Result<()> {
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|listener| {
            listener.set_nonblocking(true)?;
            TcpListener::from_std(listener)
        })
        .with_context(|| format!("metrics on {addr}"))?;
    let page = Arc::new(Page {
        pins,
        reloads,
        renders: Arc::new(Semaphore::new(MAX_RENDERS)),
    });
    tokio::spawn(accept(listener, page));
    Ok(())
}

/// What a request needs to render the page.
struct Page {
    pins: Pins,
    reloads: SharedReloads,
    renders: Arc<Semaphore>,
}

impl Page {
    /// Renders on a blocking thread once one of the [`MAX_RENDERS`] turns is free. A render
    /// whose client has gone meanwhile still finishes, holding its turn: the cap holds.
    async fn render(&self) -> Result<String> {
        let turn = self.renders.clone().acquire_owned().await?;
        let pins = self.pins.clone();
        let reloads = self.reloads.lock().map(|r| r.clone()).unwrap_or_default();
        tokio::task::spawn_blocking(move || {
            let page = render(&pins, &reloads);
            drop(turn);
            page
        })
        .await?
    }
}

/// Accepts connections for as long as the daemon runs, each served by a task of its own
/// that holds one of [`MAX_CONNECTIONS`] slots.
async fn accept(listener: TcpListener, page: Arc<Page>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let waiting = Waiting::default();
    let mut next_id: u64 = 0;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // A connection reset before it was accepted concerns that connection only;
                // anything else (out of descriptors) needs time for others to close.
                if !matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) {
                    warn!("metrics: accepting a connection: {error}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // The evicted connection's task frees its slot when it runs next. With none
                // waiting, every slot is answering a request, each done by its deadline.
                waiting.evict_oldest();
                slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        next_id += 1;
        let evicted = waiting.add(next_id);
        tokio::spawn(connection(
            stream,
            next_id,
            evicted,
            waiting.clone(),
            page.clone(),
            slot,
        ));
    }
}

/// Serves one request on `stream`, unless the connection is evicted or times out first.
async fn connection(
    stream: TcpStream,
    id: u64,
    evicted: Arc<Notify>,
    waiting: Waiting,
    page: Arc<Page>,
    slot: OwnedSemaphorePermit,
) {
    let service = {
        let waiting = waiting.clone();
        hyper::service::service_fn(move |request| {
            // The head is in: no longer idle, not to be evicted.
            waiting.remove(id);
            let page = page.clone();
            async move { Ok::<_, Infallible>(respond(&request, &page).await) }
        })
    };
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .keep_alive(false)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    // Dropping the connection closes it; its errors (a client gone, a head too slow, too big
    // or malformed) concern that client only.
    tokio::select! {
        _ = served => {}
        () = evicted.notified() => {}
        () = tokio::time::sleep(REQUEST_DEADLINE) => {}
    }
    waiting.remove(id);
    drop(slot);
}

async fn respond(request: &Request<Incoming>, page: &Page) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if !["/metrics", "/healthz", "/readyz"].contains(&path) {
        return text(
            StatusCode::NOT_FOUND,
            "see /metrics, /healthz, /readyz\n".into(),
        );
    }
    if request.method() != Method::GET {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    match path {
        // Answered by the daemon's own runtime, so a daemon whose event loop is stuck does
        // not answer: liveness.
        "/healthz" => return text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let readiness = page
                .reloads
                .lock()
                .map_err(|_| "the daemon's state is poisoned".to_string())
                .and_then(|reloads| reloads.readiness());
            return match readiness {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            };
        }
        _ => {}
    }
    match page.render().await {
        Ok(page) => {
            let mut response = Response::new(Full::new(Bytes::from(page)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            response
        }
        Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error:#}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// The connections still waiting for their request head, oldest first, each with the signal
/// that closes it. At most [`MAX_CONNECTIONS`] long, so a linear search is cheap.
#[derive(Clone, Default)]
struct Waiting(Arc<Mutex<VecDeque<Idle>>>);

/// A connection's id, and the signal that closes it.
type Idle = (u64, Arc<Notify>);

impl Waiting {
    fn add(&self, id: u64) -> Arc<Notify> {
        let evict = Arc::new(Notify::new());
        self.lock().push_back((id, evict.clone()));
        evict
    }

    fn remove(&self, id: u64) {
        self.lock().retain(|(waiting, _)| *waiting != id);
    }

    /// Closes the connection that has waited longest, if any waits.
    fn evict_oldest(&self) {
        if let Some((_, evict)) = self.lock().pop_front() {
            // Stored if the task is not waiting on it yet: it then ends when it first does.
            evict.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        // Nothing here can panic while holding the lock; a poisoned one is as good.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
