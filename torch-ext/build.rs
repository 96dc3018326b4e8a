//! Compiles csrc/*.cpp against the headers of the libtorch that torch-sys links (torch-sys
//! exports its library directory as DEP_TCH_LIBTORCH_LIB; the headers sit beside it in
//! `../include`). The CUDA parts (graphs, NCCL) are compiled only when that libtorch has
//! libtorch_cuda and the CUDA runtime headers are found (the PyPI wheel's `nvidia/cu13/include`,
//! or CUDA_HOME): otherwise their entry points answer "built without CUDA" at run time, and
//! nothing new is needed at run time either way.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=SELFPLAY_EXT_NO_CUDA");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB"));
    let root = lib.parent().expect("libtorch's lib directory has a parent").to_path_buf();
    let include = root.join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // The wheel has no Gloo headers: declarations of what c10d's header names (see
        // csrc/gloo_decl/gloo/README.md).
        .include("csrc/gloo_decl")
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // The c10d headers compile their Gloo classes only under this macro; libtorch_cpu of
        // every Linux build carries Gloo.
        .flag("-DUSE_C10D_GLOO")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .file("csrc/ext.cpp")
        .file("csrc/dist.cpp");

    let cuda = cuda_includes(&root, &lib);
    if let Some(dirs) = &cuda {
        build.define("SP_WITH_CUDA", None).define("USE_C10D_NCCL", None);
        for d in dirs {
            build.include(d);
        }
        build.file("csrc/cuda.cpp");
    }
    build.compile("selfplay_torch_ext");

    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if cuda.is_some() {
        println!("cargo:rustc-cfg=sp_with_cuda");
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-check-cfg=cfg(sp_with_cuda)");
}

/// The include directories for the CUDA runtime and NCCL headers, when this libtorch is a CUDA
/// build and they can be found.
fn cuda_includes(root: &Path, lib: &Path) -> Option<Vec<PathBuf>> {
    if std::env::var_os("SELFPLAY_EXT_NO_CUDA").is_some() || !lib.join("libtorch_cuda.so").exists() {
        return None;
    }
    // The wheel: site-packages/torch/{lib,include} beside site-packages/nvidia/...
    let site = root.parent()?;
    let mut dirs = vec![];
    let candidates = [site.join("nvidia/cu13/include"), site.join("nvidia/cuda_runtime/include")];
    // cuda_runtime.h includes crt/host_config.h, which the wheel's runtime package does not
    // ship, nor the nv/target of CUDA C++ (nvidia-cuda-crt and nvidia-cuda-cccl do; setup
    // installs them).
    let runtime = candidates
        .into_iter()
        .chain(std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include")))
        .find(|d| ["cuda_runtime_api.h", "crt/host_config.h", "nv/target"].iter().all(|f| d.join(f).exists()))?;
    dirs.push(runtime);
    for d in
        [site.join("nvidia/nccl/include")].into_iter().chain(std::env::var_os("NCCL_INCLUDE_DIR").map(PathBuf::from))
    {
        if d.join("nccl.h").exists() {
            dirs.push(d);
            return Some(dirs);
        }
    }
    // Without nccl.h the NCCL process group cannot be compiled; graphs alone are not worth a
    // second configuration.
    None
}
