//! With FRAMECAST_CUDA=1, force-link libtorch_cuda into the binaries. rustc links with
//! `--as-needed`, and nothing references libtorch_cuda's symbols directly (it registers its
//! kernels from static initialisers), so without this CUDA is silently absent at run time.
fn main() {
    println!("cargo:rerun-if-env-changed=FRAMECAST_CUDA");
    if std::env::var("FRAMECAST_CUDA").as_deref() == Ok("1") {
        println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg-bins=-ltorch_cuda");
        println!("cargo:rustc-link-arg-bins=-Wl,--allow-shlib-undefined");
    }
}
