//! `flotilla cert`: a cluster CA and node or client certificates in a directory
//! ([`flotilla::cluster`] has the layout).

use anyhow::{anyhow, Result};
use clap::Subcommand;
use flotilla::cluster;
use flotilla::raft::NodeId;
use flotilla::transport::{Grant, Role};
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
    /// Issue a client certificate (client-NAME.pem, client-NAME-key.pem) carrying a role.
    Client {
        /// Certificate directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Client name (lowercase letters, digits, '-').
        #[arg(required_unless_present = "name", conflicts_with = "name", value_name = "NAME")]
        client: Option<String>,
        /// The client name, as a flag (the form before roles existed).
        #[arg(long)]
        name: Option<String>,
        /// What the client may do: admin (everything), readwrite (get, put, delete, cas,
        /// scan), readonly (get and scan).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Limit the client to keys starting with PREFIX (a tenant); not for admin. Scans
        /// are clamped to the prefix, other requests outside it refused.
        #[arg(long, conflicts_with = "prefix_hex")]
        prefix: Option<String>,
        /// The prefix as hex bytes, for prefixes that are not text (e.g. 00ff or 7465).
        #[arg(long)]
        prefix_hex: Option<String>,
    },
    /// Print the SHA-256 of a Redis user's password, read from standard input (its first line,
    /// without the line end), for `password_sha256` in the server file's `[[resp_users]]`.
    /// The same as `printf %s "$PASSWORD" | sha256sum`.
    PasswordHash,
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
        CertCommand::Client { dir, client, name, role, prefix, prefix_hex } => {
            // clap requires exactly one of the two.
            let name = client.or(name).ok_or_else(|| anyhow!("give the client's NAME"))?;
            let prefix = match (prefix, prefix_hex) {
                (Some(p), _) => Some(p.into_bytes()),
                (None, Some(h)) => Some(parse_hex(&h)?),
                (None, None) => None,
            };
            let grant = Grant { role, prefix };
            let (cert, key) = cluster::issue_client(&dir, &name, grant.clone()).map_err(|e| anyhow!(e))?;
            let scope = match &grant.prefix {
                Some(p) => format!(", keys starting with \"{}\"", p.escape_ascii()),
                None => String::new(),
            };
            println!("client {name} (role {role}{scope}): {} and {}", cert.display(), key.display());
        }
        CertCommand::PasswordHash => {
            // From standard input, not an argument: arguments show in `ps` and shell history.
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map_err(|e| anyhow!("reading the password: {e}"))?;
            let password = line.strip_suffix('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).unwrap_or(&line);
            if password.is_empty() {
                return Err(anyhow!("no password on standard input"));
            }
            let hash = flotilla::resp_server::sha256(password.as_bytes());
            println!("{}", hash.iter().map(|b| format!("{b:02x}")).collect::<String>());
        }
    }
    Ok(0)
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

fn parse_hex(hex: &str) -> Result<Vec<u8>> {
    let hex = hex.trim();
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(anyhow!("--prefix-hex {hex:?} is not an even number of hex digits"));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|e| anyhow!("--prefix-hex {hex:?}: {e}")))
        .collect()
}
