//! A stand-in for `switchboard <role> ... --listen ADDR` in the harness's own tests: it listens, prints the
//! role's ready line, writes a line to stderr, and accepts connections until it is killed.

use std::io::Write;
use std::net::TcpListener;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let role = args.get(1).cloned().unwrap_or_default();
    let listen = args.windows(2).find(|pair| pair[0] == "--listen").map(|pair| pair[1].clone());
    let listener = TcpListener::bind(listen.as_deref().unwrap_or("127.0.0.1:0"))?;
    eprintln!("fake {role} started with {:?}", &args[1..]);
    println!("switchboard {role} listening on http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    for connection in listener.incoming() {
        drop(connection);
    }
    Ok(())
}
