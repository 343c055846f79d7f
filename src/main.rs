//! The `flotilla` binary. The server, dev cluster, CLI and admin commands arrive with the
//! node issue; until then this prints where to start.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") | Some("version") => {
            println!("flotilla {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        _ => {
            eprintln!(
                "flotilla {}: the server is not built yet.\n\
                 Run the in-process Raft cluster instead:\n  \
                 cargo run -p flotilla-raft --example cluster",
                env!("CARGO_PKG_VERSION")
            );
            std::process::exit(2)
        }
    }
}
