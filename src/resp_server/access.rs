//! Who a connection acts as, and what it may do: every request is checked here before it runs,
//! by the rules of `crate::authz` (a role allows reads, writes or both; a prefix limits every
//! key), since the front door forwards its requests to the shards as the node itself.
//!
//! - A connection that has not authenticated may send only `AUTH`, `HELLO`, `PING` and `QUIT`;
//!   anything else gets Redis's `-NOAUTH Authentication required.` (`PING` is let through, unlike
//!   Redis, so that health checks need no password).
//! - A command that reads keys needs a role that reads; one that writes, a role that writes;
//!   connection commands (`INFO`, `CLIENT`, `COMMAND`, `TIME`, ...) need nothing. A refusal is
//!   Redis's `-NOPERM` with the reason.
//! - Every key a command names must be inside the user's prefix; `SCAN`, `KEYS` and `DBSIZE`
//!   name none and are clamped to the prefix where they run (`dispatch.rs`).

use crate::authz::{self, Access};
use crate::transport::{Grant, PeerIdentity};
use bytes::Bytes;
use flotilla_resp::table::Flags;
use flotilla_resp::{error, Command, Frame};

/// Commands a connection may send before it has authenticated.
const BEFORE_AUTH: [&str; 4] = ["auth", "hello", "ping", "quit"];

/// Who an authenticated connection acts as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// For `CLIENT INFO` and refusals: `default`, a user's name, or `cert:<client name>`.
    pub user: String,
    /// The limits; `None` for none: plaintext on loopback without users (Redis's `default`
    /// user with `nopass`), a node's certificate, or a client certificate issued before roles
    /// existed (the compatibility rule of `crate::transport::cert`).
    pub grant: Option<Grant>,
}

impl Principal {
    /// The unrestricted `default` user of a listener without authentication.
    pub fn default_user() -> Principal {
        Principal { user: "default".into(), grant: None }
    }

    /// The identity a verified client certificate names.
    pub fn of_certificate(identity: &PeerIdentity) -> Principal {
        match identity {
            PeerIdentity::Node(id) => Principal { user: format!("cert:node-{id}"), grant: None },
            PeerIdentity::Client(c) => Principal { user: format!("cert:{}", c.name), grant: c.grant.clone() },
        }
    }
}

/// `-NOAUTH` for a request a connection that has not authenticated may not send.
pub fn gate(principal: Option<&Principal>, args: &[Bytes]) -> Option<Frame> {
    if principal.is_some() {
        return None;
    }
    let name = args.first().map(|n| n.as_ref()).unwrap_or_default();
    if BEFORE_AUTH.iter().any(|allowed| name.eq_ignore_ascii_case(allowed.as_bytes())) {
        return None;
    }
    Some(Frame::error(error::NO_AUTH))
}

/// Whether `principal` may run `command`; the `-NOPERM` reply if not.
pub fn authorize(principal: &Principal, command: &Command) -> Result<(), Frame> {
    let Some(grant) = &principal.grant else { return Ok(()) };
    let spec = command.spec();
    let access = if spec.flags.contains(Flags::WRITE) {
        Access::Write
    } else if spec.flags.contains(Flags::READONLY) {
        Access::Read
    } else {
        return Ok(());
    };
    if !authz::allows(grant.role, access) {
        return Err(Frame::error(format!(
            "NOPERM this user has no permissions to run the '{}' command (user {} has role {}, which may not {})",
            spec.name,
            principal.user,
            grant.role,
            if access == Access::Write { "write" } else { "read" },
        )));
    }
    if let Some(prefix) = &grant.prefix {
        if let Some(key) = command.keys().into_iter().find(|key| !authz::key_allowed(grant, key)) {
            return Err(Frame::error(format!(
                "NOPERM this user has no permissions to access one of the keys used as arguments (user {} is \
                 limited to keys starting with \"{}\"; \"{}\" is not)",
                principal.user,
                prefix.escape_ascii(),
                key.escape_ascii(),
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Role;

    fn parse(line: &str) -> Command {
        let args: Vec<Bytes> = line.split(' ').map(|a| Bytes::copy_from_slice(a.as_bytes())).collect();
        Command::parse(&args).unwrap()
    }

    fn user(grant: Option<Grant>) -> Principal {
        Principal { user: "u".into(), grant }
    }

    fn args(line: &str) -> Vec<Bytes> {
        line.split(' ').map(|a| Bytes::copy_from_slice(a.as_bytes())).collect()
    }

    #[test]
    fn before_auth_only_auth_hello_ping_and_quit() {
        for allowed in ["AUTH a b", "auth pw", "HELLO 3 AUTH a b", "PING", "quit"] {
            assert_eq!(gate(None, &args(allowed)), None, "{allowed}");
        }
        for refused in ["GET k", "SET k v", "INFO", "CLIENT ID", "NOSUCH", "SELECT 0"] {
            assert_eq!(gate(None, &args(refused)), Some(Frame::error(error::NO_AUTH)), "{refused}");
        }
        assert_eq!(gate(Some(&Principal::default_user()), &args("GET k")), None);
    }

    #[test]
    fn roles_read_and_write_as_on_the_client_protocol() {
        let readonly = user(Some(Grant::new(Role::ReadOnly)));
        for ok in ["GET k", "MGET a b", "EXISTS k", "SCAN 0", "KEYS *", "DBSIZE", "PING", "INFO", "TIME", "CLIENT ID"] {
            assert_eq!(authorize(&readonly, &parse(ok)), Ok(()), "{ok}");
        }
        for refused in ["SET k v", "DEL k", "INCR k", "APPEND k v", "MSET a 1", "MSETNX a 1", "GETDEL k", "SETNX k v"] {
            let Err(Frame::Error(e)) = authorize(&readonly, &parse(refused)) else { panic!("{refused} allowed") };
            assert!(e.starts_with(b"NOPERM this user has no permissions to run the '"), "{e:?}");
            assert!(e.ends_with(b"(user u has role readonly, which may not write)"), "{e:?}");
        }
        let readwrite = user(Some(Grant::new(Role::ReadWrite)));
        assert_eq!(authorize(&readwrite, &parse("SET k v")), Ok(()));
        assert_eq!(authorize(&user(None), &parse("SET k v")), Ok(()));
    }

    #[test]
    fn every_key_inside_the_prefix() {
        let tenant = user(Some(Grant::with_prefix(Role::ReadWrite, b"t/".to_vec())));
        for ok in ["GET t/a", "SET t/a v", "MSET t/a 1 t/b 2", "DEL t/a t/b", "SCAN 0", "KEYS *", "DBSIZE"] {
            assert_eq!(authorize(&tenant, &parse(ok)), Ok(()), "{ok}");
        }
        for refused in ["GET u/a", "SET t a", "MSET t/a 1 u/b 2", "DEL t/a x", "MGET t/a t"] {
            let Err(Frame::Error(e)) = authorize(&tenant, &parse(refused)) else { panic!("{refused} allowed") };
            assert!(
                e.starts_with(b"NOPERM this user has no permissions to access one of the keys used as arguments"),
                "{e:?}"
            );
            assert!(e
                .windows(b"limited to keys starting with \"t/\"".len())
                .any(|w| w == b"limited to keys starting with \"t/\""));
        }
    }
}
