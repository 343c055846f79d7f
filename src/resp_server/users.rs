//! Password users of the front door, in the style of Redis 6's ACL: `AUTH user password` (or
//! `AUTH password` for the user named `default`, or `HELLO 3 AUTH user password`) makes the
//! connection act as that user, with the user's role and key prefix: the same [`Grant`] a client
//! certificate carries, checked by the same rules (`crate::authz`).
//!
//! Only a password's SHA-256 is kept (Redis's ACL stores the same hash, `#<hex>`). It is
//! unsalted and fast, so it protects a long random password, not a guessable one: give users
//! passwords like `openssl rand -hex 24`. Make the hash with `flotilla cert password-hash`
//! (the password on standard input) or `printf %s "$PASSWORD" | sha256sum`. Every user's hash
//! is compared with the hash of the password given, each in constant time, so the time taken
//! tells nothing about the password.

use crate::transport::cert::check_grant;
use crate::transport::{Grant, Role};

/// One user.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    /// The name given to `AUTH` (`default` for the one-argument form).
    pub name: String,
    /// SHA-256 of the password.
    password_sha256: [u8; 32],
    /// What the user may do.
    pub grant: Grant,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hash stays out of logs and debug output.
        f.debug_struct("User").field("name", &self.name).field("grant", &self.grant).finish_non_exhaustive()
    }
}

/// Longest user name accepted.
pub const USER_NAME_BYTES_MAX: usize = 128;

impl User {
    /// A user from the configuration's text: the password's SHA-256 as 64 hex digits, a role
    /// (`admin`, `readwrite`, `readonly`) and an optional key prefix. Errors say what is wrong.
    pub fn new(name: &str, password_sha256_hex: &str, role: &str, prefix: Option<&[u8]>) -> Result<User, String> {
        if name.is_empty() || name.len() > USER_NAME_BYTES_MAX || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "user name {name:?}: give 1 to {USER_NAME_BYTES_MAX} printable characters without blanks"
            ));
        }
        let password_sha256 = parse_sha256_hex(password_sha256_hex).ok_or_else(|| {
            format!("user {name}: password_sha256 is not 64 hex digits (printf %s \"$PASSWORD\" | sha256sum)")
        })?;
        let role: Role = role.parse().map_err(|e| format!("user {name}: {e}"))?;
        let grant = Grant { role, prefix: prefix.map(<[u8]>::to_vec) };
        check_grant(&grant).map_err(|e| format!("user {name}: {e}"))?;
        Ok(User { name: name.to_string(), password_sha256, grant })
    }
}

/// The configured users; none means password authentication is off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Users {
    users: Vec<User>,
}

impl Users {
    /// The users, checked: names must differ.
    pub fn new(users: Vec<User>) -> Result<Users, String> {
        for (i, u) in users.iter().enumerate() {
            if users[..i].iter().any(|other| other.name == u.name) {
                return Err(format!("user {} is configured twice", u.name));
            }
        }
        Ok(Users { users })
    }

    /// Whether any user is configured (then a connection without a client certificate must
    /// authenticate).
    pub fn any(&self) -> bool {
        !self.users.is_empty()
    }

    /// The user `name` if `password` is theirs. Every user's hash is compared in constant time,
    /// whatever the name, so the time taken tells nothing about the password.
    pub fn check(&self, name: &[u8], password: &[u8]) -> Option<&User> {
        let hash = sha256(password);
        let mut found = None;
        for user in &self.users {
            let same_name = user.name.as_bytes() == name;
            let same_password = constant_time_eq(&user.password_sha256, &hash);
            if same_name & same_password {
                found = Some(user);
            }
        }
        found
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// 64 hex digits (either case) as 32 bytes.
fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Whether `a` and `b` are equal, looking at every byte whatever the first difference.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `printf %s secret | sha256sum`
    const SECRET_SHA256: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";

    #[test]
    fn the_hash_is_the_one_sha256sum_prints() {
        assert_eq!(parse_sha256_hex(SECRET_SHA256), Some(sha256(b"secret")));
        assert_eq!(parse_sha256_hex(&SECRET_SHA256.to_uppercase()), Some(sha256(b"secret")));
    }

    #[test]
    fn the_right_password_of_the_right_user_only() {
        let users = Users::new(vec![
            User::new("app", SECRET_SHA256, "readwrite", None).unwrap(),
            User::new("default", &"ab".repeat(32), "readonly", None).unwrap(),
        ])
        .unwrap();
        assert!(users.any());
        assert_eq!(users.check(b"app", b"secret").map(|u| u.name.as_str()), Some("app"));
        assert_eq!(users.check(b"app", b"Secret"), None);
        assert_eq!(users.check(b"app", b"secret "), None);
        assert_eq!(users.check(b"app", b""), None);
        // The right password under another user's name.
        assert_eq!(users.check(b"default", b"secret"), None);
        assert_eq!(users.check(b"nobody", b"secret"), None);
        assert!(!Users::default().any());
        assert_eq!(Users::default().check(b"default", b""), None);
    }

    #[test]
    fn bad_configuration_is_refused_with_the_reason() {
        let err = |name: &str, hash: &str, role: &str, prefix: Option<&[u8]>| {
            User::new(name, hash, role, prefix).unwrap_err()
        };
        assert!(err("app", "secret", "readwrite", None).contains("64 hex digits"));
        assert!(err("app", &"zz".repeat(32), "readwrite", None).contains("64 hex digits"));
        assert!(err("app", &SECRET_SHA256[1..], "readwrite", None).contains("64 hex digits"));
        assert!(err("app", SECRET_SHA256, "writer", None).contains("unknown role"));
        assert!(err("app", SECRET_SHA256, "admin", Some(b"t/")).contains("cannot be limited to a prefix"));
        assert!(err("app", SECRET_SHA256, "readonly", Some(b"\x00t")).contains("0x00"));
        assert!(err("", SECRET_SHA256, "readonly", None).contains("user name"));
        assert!(err("a b", SECRET_SHA256, "readonly", None).contains("user name"));
        let twice = vec![
            User::new("app", SECRET_SHA256, "readwrite", None).unwrap(),
            User::new("app", SECRET_SHA256, "readonly", None).unwrap(),
        ];
        assert!(Users::new(twice).unwrap_err().contains("twice"));
        // The hash never shows in debug output.
        let user = User::new("app", SECRET_SHA256, "readwrite", Some(b"t/")).unwrap();
        assert!(!format!("{user:?}").contains("2bb8"));
        assert_eq!(user.grant, Grant::with_prefix(Role::ReadWrite, b"t/".to_vec()));
    }
}
