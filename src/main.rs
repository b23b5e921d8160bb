//! The `tollgate` binary: everything is in the library; see `cli`.

// jemalloc: glibc malloc/free was ~13–16 % of the proxy threads' CPU under load (benches/).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
