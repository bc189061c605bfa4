//! Embeds the eBPF object when `PROXY_EBPF_OBJECT` names one (every `cargo xtask` build
//! does); without it the proxy builds with no BPF toolchain and serves without kernel metrics.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(proxy_ebpf_embedded)");
    println!("cargo::rerun-if-env-changed=PROXY_EBPF_OBJECT");
    if let Ok(path) = std::env::var("PROXY_EBPF_OBJECT") {
        if !std::path::Path::new(&path).is_file() {
            panic!("PROXY_EBPF_OBJECT={path} is not a file; run `cargo xtask build-ebpf`");
        }
        println!("cargo::rerun-if-changed={path}");
        println!("cargo::rustc-cfg=proxy_ebpf_embedded");
    }
}
