// libtorch_cuda registers the CUDA backend from static initialisers only: nothing references
// its symbols, so an as-needed linker drops it and CUDA silently disappears. Force it in when
// the libtorch we build against has it.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").ok();
    if let Some(dir) = lib {
        let dir = std::path::Path::new(&dir);
        // Found at run time without LD_LIBRARY_PATH on the machine that built it.
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{}", dir.display());
        if dir.join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-search=native={}", dir.display());
            println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
