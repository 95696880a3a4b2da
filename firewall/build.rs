//! Builds the XDP program (firewall-ebpf) with the nightly toolchain and bpf-linker, and
//! leaves it in OUT_DIR for `include_bytes_aligned!`.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../firewall-ebpf");
    let root = std::fs::canonicalize(root).context("locating firewall-ebpf")?;
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    println!("cargo:rerun-if-changed={root}/../firewall-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "firewall-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    // With AYA_BUILD_SKIP=1 (userspace-only builds) there is no object: embed an empty one,
    // which the loader reports as such.
    let object = std::path::Path::new(&std::env::var("OUT_DIR")?).join("firewall");
    if !object.exists() {
        std::fs::write(&object, b"")?;
    }
    Ok(())
}
