//! Compiles the fused CPU kernels against the libtorch headers, gives cairn's binaries an
//! rpath to libtorch, so they run without LD_LIBRARY_PATH, and (with the `cuda` feature)
//! forces libtorch_cuda to be linked so CUDA works at run time.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let Ok(lib) = env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    build_kernels(&PathBuf::from(&lib));
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

/// Builds the fused kernels into a static library: `src/model/fused/kernels.cpp`, and the
/// attention and product kernels of `attention.inc` and `gemm.inc` once per instruction set
/// (`isa_{v4,v3,base}.cpp`: x86-64-v4, x86-64-v3, the baseline; `isa_v4_bf16.cpp`: v4 with
/// AVX512-BF16, for bf16 products; `kernels.cpp` picks one set at load time). They include ATen headers and run inside
/// libtorch's OpenMP pool, so they are compiled with `-fopenmp` and link the same libgomp
/// libtorch ships (torch-sys already asks for `-lgomp`, found through the rpath). Always
/// optimised: the test profile would otherwise build these loops at -O0.
fn build_kernels(lib: &std::path::Path) {
    const DIR: &str = "src/model/fused";
    for file in [
        "kernels.cpp",
        "simd.h",
        "attention.h",
        "attention.inc",
        "gemm.h",
        "gemm.inc",
        "isa_v4.cpp",
        "isa_v3.cpp",
        "isa_base.cpp",
        "isa_v4_bf16.cpp",
    ] {
        println!("cargo:rerun-if-changed={DIR}/{file}");
    }
    let root = lib.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    let include = root.join("include");
    let build = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag("-fopenmp")
            .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
            .flag_if_supported("-Wno-unused-parameter")
            // v16 values never cross a call boundary between clones of different ISAs.
            .flag_if_supported("-Wno-psabi")
            // GCC 12's own _mm512_cvtph_ps starts from _mm512_undefined_ps, which it then
            // reports as maybe uninitialised once inlined.
            .flag_if_supported("-Wno-maybe-uninitialized")
            .opt_level(3)
            .debug(false);
        b
    };
    let mut objects = Vec::new();
    for (file, march) in [
        ("isa_v4.cpp", Some("x86-64-v4")),
        ("isa_v3.cpp", Some("x86-64-v3")),
        ("isa_base.cpp", None),
        ("isa_v4_bf16.cpp", Some("x86-64-v4")),
    ] {
        let mut b = build();
        b.file(format!("{DIR}/{file}"));
        if let Some(march) = march {
            b.flag(format!("-march={march}"));
        }
        if file.contains("bf16") {
            // A compiler without it builds the widening bf16 tiles there instead.
            b.flag_if_supported("-mavx512bf16");
        }
        objects.extend(b.compile_intermediates());
    }
    build()
        .file(format!("{DIR}/kernels.cpp"))
        .objects(objects)
        .compile("cairn_kernels");
}
