//! `flotilla cert`: a cluster CA and node or client certificates in a directory
//! ([`flotilla::cluster`] has the layout).

use anyhow::{anyhow, Result};
use clap::Subcommand;
use flotilla::cluster;
use flotilla::raft::NodeId;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum CertCommand {
    /// Create a CA (ca.pem, ca-key.pem) in DIR.
    Ca {
        /// Certificate directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node certificate (node-ID.pem, node-ID-key.pem).
    Node {
        /// Certificate directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Node id.
        #[arg(long)]
        id: u64,
    },
    /// Issue a client certificate (client-NAME.pem, client-NAME-key.pem).
    Client {
        /// Certificate directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Client name (letters, digits, '-').
        #[arg(long)]
        name: String,
    },
}

pub fn run(c: CertCommand) -> Result<i32> {
    match c {
        CertCommand::Ca { dir } => {
            cluster::create_ca(&dir).map_err(|e| anyhow!(e))?;
            println!("CA written to {}", dir.join("ca.pem").display());
        }
        CertCommand::Node { dir, id } => {
            let (cert, key) = cluster::issue_node(&dir, NodeId(id)).map_err(|e| anyhow!(e))?;
            println!("node {id}: {} and {}", cert.display(), key.display());
        }
        CertCommand::Client { dir, name } => {
            let (cert, key) = cluster::issue_client(&dir, &name).map_err(|e| anyhow!(e))?;
            println!("client {name}: {} and {}", cert.display(), key.display());
        }
    }
    Ok(0)
}
