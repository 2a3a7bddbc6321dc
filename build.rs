//! Gives cairn's binaries an rpath to libtorch, so they run without LD_LIBRARY_PATH, and
//! (with the `cuda` feature) forces libtorch_cuda to be linked so CUDA works at run time.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let Ok(lib) = env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let real = PathBuf::from(&lib).join("libtorch_cuda.so");
        if !real.exists() {
            // A CPU libtorch: link an empty stub with the right SONAME, placed last in the
            // RUNPATH, so a CUDA libtorch found through LD_LIBRARY_PATH wins at run time.
            let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
            let stub_dir = out.join("cuda-stub");
            std::fs::create_dir_all(&stub_dir).expect("create stub dir");
            let src = stub_dir.join("stub.c");
            std::fs::write(&src, "void cairn_cuda_stub(void) {}\n").expect("write stub");
            let status = Command::new("cc")
                .args(["-shared", "-fPIC", "-Wl,-soname,libtorch_cuda.so", "-o"])
                .arg(stub_dir.join("libtorch_cuda.so"))
                .arg(&src)
                .status()
                .expect("run cc for the libtorch_cuda stub");
            assert!(status.success(), "building the libtorch_cuda stub failed");
            println!("cargo:rustc-link-search=native={}", stub_dir.display());
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", stub_dir.display());
        }
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
