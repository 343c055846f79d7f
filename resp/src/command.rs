//! Commands in their typed form, checked against the table and Redis's argument rules.
//!
//! [`Command::parse`] turns a request's arguments into a [`Command`] or into the error
//! Redis would reply with, in Redis's order of checks: unknown command, unknown
//! subcommand, arity, then the command's own syntax, then the values of its arguments
//! (so `SET k v EX x BADOPT` is a syntax error, not a bad integer). What is left to the
//! server is what needs data or policy: `WRONGTYPE`, overflow of a stored counter, whether
//! an expiry or `SELECT 1` is supported.
//!
//! Keys, values and names stay `Bytes` slices of the request: parsing copies nothing.

use bytes::Bytes;

use crate::error::{self, CommandError};
use crate::frame::Protocol;
use crate::number::{parse_f64, parse_i64};
use crate::table::{self, CommandSpec};

/// `SET`'s condition.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SetCondition {
    /// `NX`: only if the key does not exist.
    IfMissing,
    /// `XX`: only if the key exists.
    IfExists,
}

/// `SET`'s expiry option, validated (positive, no overflow in milliseconds).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// `EX seconds`
    Seconds(i64),
    /// `PX milliseconds`
    Milliseconds(i64),
    /// `EXAT unix-time-seconds`
    AtSeconds(i64),
    /// `PXAT unix-time-milliseconds`
    AtMilliseconds(i64),
    /// `KEEPTTL`: keep the key's current time to live.
    KeepTtl,
}

/// `FLUSHDB`/`FLUSHALL`'s mode.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FlushMode {
    /// Neither given: the server's default.
    Default,
    /// `ASYNC`
    Async,
    /// `SYNC`
    Sync,
}

/// `AUTH`'s or `HELLO AUTH`'s credentials. Their `Debug` output (and so a [`Command`]'s)
/// leaves the password out: commands end up in logs and panic messages.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `None` for the one-argument `AUTH password` (the `default` user).
    pub username: Option<Bytes>,
    /// The password.
    pub password: Bytes,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// A request, checked and typed.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// `PING [message]`
    Ping {
        /// Echoed back as a bulk string if given; `PONG` otherwise.
        message: Option<Bytes>,
    },
    /// `ECHO message`
    Echo {
        /// Sent back.
        message: Bytes,
    },
    /// `HELLO [protover [AUTH username password] [SETNAME clientname]]`
    Hello {
        /// The version to switch to; `None` keeps the current one.
        protocol: Option<Protocol>,
        /// Authenticate first, if given.
        auth: Option<Credentials>,
        /// Name the connection, if given (validated like `CLIENT SETNAME`).
        client_name: Option<Bytes>,
    },
    /// `AUTH [username] password`
    Auth(Credentials),
    /// `QUIT`: reply `OK`, then close.
    Quit,
    /// `SELECT index`
    Select {
        /// The database number (any `i32`; the server decides which exist).
        db: i32,
    },
    /// `CLIENT SETNAME name`; an empty name clears it.
    ClientSetName {
        /// Validated: no blanks or bytes outside `!`..`~`.
        name: Bytes,
    },
    /// `CLIENT SETINFO LIB-NAME|LIB-VER value`: what the client library says it is (Redis
    /// 7.2; redis-py, go-redis, node-redis, Lettuce and Jedis send it on connecting).
    ClientSetInfo {
        /// Which attribute.
        attr: ClientAttr,
        /// Validated as a client name is; empty clears it.
        value: Bytes,
    },
    /// `CLIENT GETNAME`
    ClientGetName,
    /// `CLIENT ID`
    ClientId,
    /// `CLIENT INFO`
    ClientInfo,
    /// `CLIENT HELP`
    ClientHelp,
    /// `COMMAND` without a subcommand: the info of every command.
    CommandAll,
    /// `COMMAND COUNT`
    CommandCount,
    /// `COMMAND DOCS [name ...]`; no names means all.
    CommandDocs {
        /// The names asked for, as sent.
        names: Vec<Bytes>,
    },
    /// `COMMAND INFO [name ...]`; no names means all.
    CommandInfo {
        /// The names asked for, as sent.
        names: Vec<Bytes>,
    },
    /// `COMMAND HELP`
    CommandHelp,
    /// `INFO [section ...]`
    Info {
        /// The sections asked for, as sent; none means the default set.
        sections: Vec<Bytes>,
    },
    /// `GET key`
    Get {
        /// The key.
        key: Bytes,
    },
    /// `SET key value [NX|XX] [GET] [EX|PX|EXAT|PXAT n|KEEPTTL]`
    Set {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
        /// `NX` or `XX`.
        condition: Option<SetCondition>,
        /// `GET`: reply with the old value instead of `OK`.
        get: bool,
        /// The expiry option, if given.
        expiry: Option<Expiry>,
    },
    /// `SETNX key value`
    SetNx {
        /// The key.
        key: Bytes,
        /// The value.
        value: Bytes,
    },
    /// `GETSET key value`
    GetSet {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
    },
    /// `GETDEL key`
    GetDel {
        /// The key.
        key: Bytes,
    },
    /// `DEL key [key ...]`
    Del {
        /// At least one.
        keys: Vec<Bytes>,
    },
    /// `UNLINK key [key ...]` (the same as `DEL` for us).
    Unlink {
        /// At least one.
        keys: Vec<Bytes>,
    },
    /// `EXISTS key [key ...]`: counts repeated keys as often as they are named.
    Exists {
        /// At least one.
        keys: Vec<Bytes>,
    },
    /// `STRLEN key`
    Strlen {
        /// The key.
        key: Bytes,
    },
    /// `APPEND key value`
    Append {
        /// The key.
        key: Bytes,
        /// Appended.
        value: Bytes,
    },
    /// `INCR key`
    Incr {
        /// The key.
        key: Bytes,
    },
    /// `DECR key`
    Decr {
        /// The key.
        key: Bytes,
    },
    /// `INCRBY key increment`
    IncrBy {
        /// The key.
        key: Bytes,
        /// Added.
        increment: i64,
    },
    /// `DECRBY key decrement`
    DecrBy {
        /// The key.
        key: Bytes,
        /// Subtracted; never `i64::MIN` (Redis refuses it: its negation overflows).
        decrement: i64,
    },
    /// `INCRBYFLOAT key increment`
    IncrByFloat {
        /// The key.
        key: Bytes,
        /// Finite or infinite, never NaN; an infinite result is the server's error.
        delta: f64,
    },
    /// `MGET key [key ...]`
    MGet {
        /// At least one.
        keys: Vec<Bytes>,
    },
    /// `MSET key value [key value ...]`
    MSet {
        /// At least one pair.
        pairs: Vec<(Bytes, Bytes)>,
    },
    /// `MSETNX key value [key value ...]`
    MSetNx {
        /// At least one pair.
        pairs: Vec<(Bytes, Bytes)>,
    },
    /// `SCAN cursor [MATCH pattern] [COUNT count] [TYPE type]`
    Scan {
        /// Where to go on from; 0 starts.
        cursor: u64,
        /// `MATCH`, unless it is `*` (which matches everything anyway).
        pattern: Option<Bytes>,
        /// `COUNT`: at least 1.
        count: Option<u64>,
        /// `TYPE`, as sent.
        type_name: Option<Bytes>,
    },
    /// `KEYS pattern`
    Keys {
        /// A glob-style pattern.
        pattern: Bytes,
    },
    /// `DBSIZE`
    DbSize,
    /// `FLUSHDB [ASYNC|SYNC]`
    FlushDb(FlushMode),
    /// `FLUSHALL [ASYNC|SYNC]`
    FlushAll(FlushMode),
    /// `TIME`
    Time,
    /// `READONLY`
    ReadOnly,
    /// `READWRITE`
    ReadWrite,
    /// `TYPE key`
    Type {
        /// The key.
        key: Bytes,
    },
}

impl Command {
    /// Checks a request (the command name first) and types it.
    pub fn parse(args: &[Bytes]) -> Result<Command, CommandError> {
        let spec = resolve(args)?;
        let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
        let key = arg(1);
        let from = |i: usize| args.get(i..).unwrap_or_default().to_vec();
        Ok(match spec.name {
            "ping" if args.len() > 2 => return Err(CommandError::wrong_arity(spec.name)),
            "ping" => Command::Ping { message: args.get(1).cloned() },
            "echo" => Command::Echo { message: key },
            "hello" => parse_hello(args)?,
            "auth" => match args {
                [_, password] => Command::Auth(Credentials { username: None, password: password.clone() }),
                [_, username, password] => {
                    Command::Auth(Credentials { username: Some(username.clone()), password: password.clone() })
                }
                _ => return Err(CommandError::from_static(error::SYNTAX)),
            },
            "quit" => Command::Quit,
            "select" => {
                Command::Select { db: parse_int(&key).and_then(|db| i32::try_from(db).map_err(|_| not_int()))? }
            }
            "client|setname" => Command::ClientSetName { name: valid_client_name(arg(2))? },
            "client|setinfo" => parse_client_setinfo(arg(2), arg(3))?,
            "client|getname" => Command::ClientGetName,
            "client|id" => Command::ClientId,
            "client|info" => Command::ClientInfo,
            "client|help" => Command::ClientHelp,
            "command" => Command::CommandAll,
            "command|count" => Command::CommandCount,
            "command|docs" => Command::CommandDocs { names: from(2) },
            "command|info" => Command::CommandInfo { names: from(2) },
            "command|help" => Command::CommandHelp,
            "info" => Command::Info { sections: from(1) },
            "get" => Command::Get { key },
            "set" => parse_set(args)?,
            "setnx" => Command::SetNx { key, value: arg(2) },
            "getset" => Command::GetSet { key, value: arg(2) },
            "getdel" => Command::GetDel { key },
            "del" => Command::Del { keys: from(1) },
            "unlink" => Command::Unlink { keys: from(1) },
            "exists" => Command::Exists { keys: from(1) },
            "strlen" => Command::Strlen { key },
            "append" => Command::Append { key, value: arg(2) },
            "incr" => Command::Incr { key },
            "decr" => Command::Decr { key },
            "incrby" => Command::IncrBy { key, increment: parse_int(&arg(2))? },
            "decrby" => match parse_int(&arg(2))? {
                i64::MIN => return Err(CommandError::from_static(error::DECREMENT_OVERFLOW)),
                decrement => Command::DecrBy { key, decrement },
            },
            "incrbyfloat" => Command::IncrByFloat {
                key,
                delta: parse_f64(&arg(2)).ok_or(CommandError::from_static(error::NOT_A_FLOAT))?,
            },
            "mget" => Command::MGet { keys: from(1) },
            "mset" => Command::MSet { pairs: pairs(spec, args)? },
            "msetnx" => Command::MSetNx { pairs: pairs(spec, args)? },
            "scan" => parse_scan(args)?,
            "keys" => Command::Keys { pattern: key },
            "dbsize" => Command::DbSize,
            "flushdb" => Command::FlushDb(flush_mode(args)?),
            "flushall" => Command::FlushAll(flush_mode(args)?),
            "time" => Command::Time,
            "readonly" => Command::ReadOnly,
            "readwrite" => Command::ReadWrite,
            "type" => Command::Type { key },
            // A table entry without a parser is a bug of ours; say so rather than panic.
            other => return Err(CommandError::new(format!("ERR command '{other}' is not implemented"))),
        })
    }

    /// The table's entry for this command.
    pub fn spec(&self) -> &'static CommandSpec {
        let name = match self {
            Command::Ping { .. } => "ping",
            Command::Echo { .. } => "echo",
            Command::Hello { .. } => "hello",
            Command::Auth(_) => "auth",
            Command::Quit => "quit",
            Command::Select { .. } => "select",
            Command::ClientSetName { .. } => "client|setname",
            Command::ClientSetInfo { .. } => "client|setinfo",
            Command::ClientGetName => "client|getname",
            Command::ClientId => "client|id",
            Command::ClientInfo => "client|info",
            Command::ClientHelp => "client|help",
            Command::CommandAll => "command",
            Command::CommandCount => "command|count",
            Command::CommandDocs { .. } => "command|docs",
            Command::CommandInfo { .. } => "command|info",
            Command::CommandHelp => "command|help",
            Command::Info { .. } => "info",
            Command::Get { .. } => "get",
            Command::Set { .. } => "set",
            Command::SetNx { .. } => "setnx",
            Command::GetSet { .. } => "getset",
            Command::GetDel { .. } => "getdel",
            Command::Del { .. } => "del",
            Command::Unlink { .. } => "unlink",
            Command::Exists { .. } => "exists",
            Command::Strlen { .. } => "strlen",
            Command::Append { .. } => "append",
            Command::Incr { .. } => "incr",
            Command::Decr { .. } => "decr",
            Command::IncrBy { .. } => "incrby",
            Command::DecrBy { .. } => "decrby",
            Command::IncrByFloat { .. } => "incrbyfloat",
            Command::MGet { .. } => "mget",
            Command::MSet { .. } => "mset",
            Command::MSetNx { .. } => "msetnx",
            Command::Scan { .. } => "scan",
            Command::Keys { .. } => "keys",
            Command::DbSize => "dbsize",
            Command::FlushDb(_) => "flushdb",
            Command::FlushAll(_) => "flushall",
            Command::Time => "time",
            Command::ReadOnly => "readonly",
            Command::ReadWrite => "readwrite",
            Command::Type { .. } => "type",
        };
        table::spec_by_full_name(name.as_bytes()).unwrap_or(&UNKNOWN_SPEC)
    }

    /// For INCR, DECR, INCRBY and DECRBY, which differ only in it: the key and the amount
    /// to add.
    pub fn counter_delta(&self) -> Option<(&Bytes, i64)> {
        match self {
            Command::Incr { key } => Some((key, 1)),
            Command::Decr { key } => Some((key, -1)),
            Command::IncrBy { key, increment } => Some((key, *increment)),
            Command::DecrBy { key, decrement } => Some((key, decrement.checked_neg()?)),
            _ => None,
        }
    }

    /// The keys it touches, in argument order, for routing to shards.
    pub fn keys(&self) -> Vec<&Bytes> {
        match self {
            Command::Get { key }
            | Command::Set { key, .. }
            | Command::SetNx { key, .. }
            | Command::GetSet { key, .. }
            | Command::GetDel { key }
            | Command::Strlen { key }
            | Command::Append { key, .. }
            | Command::Incr { key }
            | Command::Decr { key }
            | Command::IncrBy { key, .. }
            | Command::DecrBy { key, .. }
            | Command::IncrByFloat { key, .. }
            | Command::Type { key } => vec![key],
            Command::Del { keys } | Command::Unlink { keys } | Command::Exists { keys } | Command::MGet { keys } => {
                keys.iter().collect()
            }
            Command::MSet { pairs } | Command::MSetNx { pairs } => pairs.iter().map(|(key, _)| key).collect(),
            _ => Vec::new(),
        }
    }
}

/// What [`Command::spec`] falls back to if the table lost an entry (a test keeps it from
/// happening).
static UNKNOWN_SPEC: CommandSpec = CommandSpec {
    name: "unknown",
    arity: -1,
    flags: table::Flags::NONE,
    first_key: 0,
    last_key: 0,
    key_step: 0,
    group: "",
    categories: &[],
    summary: "",
    since: "",
    complexity: "",
    args: &[],
    subcommands: &[],
};

/// Finds the command or subcommand and checks its arity, with Redis's errors.
pub fn resolve(args: &[Bytes]) -> Result<&'static CommandSpec, CommandError> {
    let name = args.first().map(|name| &name[..]).unwrap_or_default();
    let spec = table::spec(name).ok_or_else(|| CommandError::unknown_command(args))?;
    let spec = match args.get(1) {
        Some(sub) if spec.is_container() => {
            spec.subcommand(sub).ok_or_else(|| CommandError::unknown_subcommand(name, sub))?
        }
        _ => spec,
    };
    if !spec.arity_allows(args.len()) {
        return Err(CommandError::wrong_arity(spec.name));
    }
    Ok(spec)
}

fn not_int() -> CommandError {
    CommandError::from_static(error::NOT_AN_INTEGER)
}

fn parse_int(text: &[u8]) -> Result<i64, CommandError> {
    parse_i64(text).ok_or_else(not_int)
}

fn is(arg: &[u8], token: &str) -> bool {
    arg.eq_ignore_ascii_case(token.as_bytes())
}

/// Redis allows client names of printable ASCII without spaces; empty clears the name.
fn valid_client_name(name: Bytes) -> Result<Bytes, CommandError> {
    if name.iter().all(|&b| (b'!'..=b'~').contains(&b)) {
        Ok(name)
    } else {
        Err(CommandError::from_static(error::INVALID_CLIENT_NAME))
    }
}

/// An attribute of `CLIENT SETINFO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAttr {
    /// `LIB-NAME`
    LibName,
    /// `LIB-VER`
    LibVer,
}

fn parse_client_setinfo(attr: Bytes, value: Bytes) -> Result<Command, CommandError> {
    let attr = if attr.eq_ignore_ascii_case(b"lib-name") {
        ClientAttr::LibName
    } else if attr.eq_ignore_ascii_case(b"lib-ver") {
        ClientAttr::LibVer
    } else {
        return Err(CommandError::new(format!("ERR Unrecognized option '{}'", String::from_utf8_lossy(&attr))));
    };
    if !value.iter().all(|&b| (b'!'..=b'~').contains(&b)) {
        let name = if attr == ClientAttr::LibName { "lib-name" } else { "lib-ver" };
        return Err(CommandError::new(format!("ERR {name} cannot contain spaces, newlines or special characters.")));
    }
    Ok(Command::ClientSetInfo { attr, value })
}

fn parse_hello(args: &[Bytes]) -> Result<Command, CommandError> {
    let mut protocol = None;
    let mut auth = None;
    let mut client_name = None;
    if let Some(version) = args.get(1) {
        let version = parse_i64(version).ok_or(CommandError::from_static(error::PROTOCOL_VERSION_NOT_AN_INTEGER))?;
        protocol = Some(Protocol::from_number(version).ok_or(CommandError::from_static(error::NO_PROTO))?);
    }
    let mut rest = args.get(2..).unwrap_or_default();
    loop {
        rest = match rest {
            [] => break,
            [option, username, password, tail @ ..] if is(option, "AUTH") => {
                auth = Some(Credentials { username: Some(username.clone()), password: password.clone() });
                tail
            }
            [option, name, tail @ ..] if is(option, "SETNAME") => {
                client_name = Some(valid_client_name(name.clone())?);
                tail
            }
            [option, ..] => {
                let mut message = b"ERR Syntax error in HELLO option '".to_vec();
                message.extend_from_slice(option);
                message.push(b'\'');
                return Err(CommandError::new(message));
            }
        };
    }
    Ok(Command::Hello { protocol, auth, client_name })
}

fn parse_set(args: &[Bytes]) -> Result<Command, CommandError> {
    let [_, key, value, ..] = args else { return Err(CommandError::wrong_arity("set")) };
    let syntax = || CommandError::from_static(error::SYNTAX);
    let mut condition = None;
    let mut get = false;
    // The expiry's kind and its unchecked argument: Redis reports a syntax error anywhere
    // in the options before a bad number.
    let mut expiry: Option<(&str, Option<&Bytes>)> = None;
    let mut at = 3;
    while let Some(option) = args.get(at) {
        let next = args.get(at + 1);
        let kind = ["EX", "PX", "EXAT", "PXAT", "KEEPTTL"].into_iter().find(|kind| is(option, kind));
        if is(option, "NX") && condition != Some(SetCondition::IfExists) {
            condition = Some(SetCondition::IfMissing);
        } else if is(option, "XX") && condition != Some(SetCondition::IfMissing) {
            condition = Some(SetCondition::IfExists);
        } else if is(option, "GET") {
            get = true;
        } else if let Some(kind) = kind.filter(|&kind| expiry.is_none_or(|(seen, _)| seen == kind)) {
            // The same option again replaces the value; another one is a syntax error.
            if kind == "KEEPTTL" {
                expiry = Some((kind, None));
            } else {
                let value = next.ok_or_else(syntax)?;
                expiry = Some((kind, Some(value)));
                at += 1;
            }
        } else {
            return Err(syntax());
        }
        at += 1;
    }
    let expiry = match expiry {
        None => None,
        Some((_, None)) => Some(Expiry::KeepTtl),
        Some((kind, Some(value))) => {
            let n = parse_int(value)?;
            let seconds = kind == "EX" || kind == "EXAT";
            if n <= 0 || (seconds && n > i64::MAX / 1000) {
                return Err(CommandError::invalid_expire_time("set"));
            }
            Some(match kind {
                "EX" => Expiry::Seconds(n),
                "PX" => Expiry::Milliseconds(n),
                "EXAT" => Expiry::AtSeconds(n),
                _ => Expiry::AtMilliseconds(n),
            })
        }
    };
    Ok(Command::Set { key: key.clone(), value: value.clone(), condition, get, expiry })
}

fn pairs(spec: &CommandSpec, args: &[Bytes]) -> Result<Vec<(Bytes, Bytes)>, CommandError> {
    let rest = args.get(1..).unwrap_or_default();
    if rest.len() % 2 != 0 {
        return Err(CommandError::wrong_arity(spec.name));
    }
    Ok(rest
        .chunks_exact(2)
        .filter_map(|pair| match pair {
            [key, value] => Some((key.clone(), value.clone())),
            _ => None,
        })
        .collect())
}

fn parse_scan(args: &[Bytes]) -> Result<Command, CommandError> {
    let [_, cursor, ..] = args else { return Err(CommandError::wrong_arity("scan")) };
    let syntax = || CommandError::from_static(error::SYNTAX);
    // Redis reads the cursor with strtoull; only plain digits are a cursor it hands out.
    let cursor = std::str::from_utf8(cursor)
        .ok()
        .filter(|text| text.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|text| text.parse::<u64>().ok())
        .ok_or(CommandError::from_static(error::INVALID_CURSOR))?;
    let (mut pattern, mut count, mut type_name) = (None, None, None);
    let mut at = 2;
    while let Some(option) = args.get(at) {
        let value = args.get(at + 1).ok_or_else(syntax)?;
        if is(option, "COUNT") {
            let n = parse_int(value)?;
            count = Some(u64::try_from(n).ok().filter(|&n| n >= 1).ok_or_else(syntax)?);
        } else if is(option, "MATCH") {
            pattern = (&value[..] != b"*").then(|| value.clone());
        } else if is(option, "TYPE") {
            type_name = Some(value.clone());
        } else {
            return Err(syntax());
        }
        at += 2;
    }
    Ok(Command::Scan { cursor, pattern, count, type_name })
}

fn flush_mode(args: &[Bytes]) -> Result<FlushMode, CommandError> {
    match args {
        [_] => Ok(FlushMode::Default),
        [_, mode] if is(mode, "ASYNC") => Ok(FlushMode::Async),
        [_, mode] if is(mode, "SYNC") => Ok(FlushMode::Sync),
        _ => Err(CommandError::from_static(error::SYNTAX)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::COMMANDS;

    fn args(text: &str) -> Vec<Bytes> {
        text.split(' ').map(|a| Bytes::copy_from_slice(a.as_bytes())).collect()
    }

    fn parse(text: &str) -> Result<Command, String> {
        Command::parse(&args(text)).map_err(|e| e.to_string())
    }

    fn b(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    #[test]
    fn every_command_and_subcommand_parses_and_maps_back_to_its_spec() {
        let samples = [
            "PING",
            "PING hi",
            "ECHO hi",
            "HELLO",
            "HELLO 3",
            "AUTH pw",
            "AUTH user pw",
            "QUIT",
            "SELECT 0",
            "CLIENT SETNAME n",
            "CLIENT GETNAME",
            "CLIENT ID",
            "CLIENT INFO",
            "CLIENT HELP",
            "COMMAND",
            "COMMAND COUNT",
            "COMMAND DOCS",
            "COMMAND INFO get",
            "COMMAND HELP",
            "INFO",
            "CLIENT SETINFO lib-name redis-py",
            "GET k",
            "SET k v",
            "SETNX k v",
            "GETSET k v",
            "GETDEL k",
            "DEL k",
            "UNLINK k",
            "EXISTS k",
            "STRLEN k",
            "APPEND k v",
            "INCR k",
            "INCRBY k 2",
            "DECR k",
            "DECRBY k 2",
            "INCRBYFLOAT k 1.5",
            "MGET k",
            "MSET k v",
            "MSETNX k v",
            "SCAN 0",
            "KEYS *",
            "DBSIZE",
            "FLUSHDB",
            "FLUSHALL",
            "READONLY",
            "READWRITE",
            "TIME",
            "TYPE k",
        ];
        let mut covered = std::collections::HashSet::new();
        for sample in samples {
            let command = parse(sample).unwrap_or_else(|e| panic!("{sample}: {e}"));
            let words: Vec<String> = sample.split(' ').map(str::to_ascii_lowercase).collect();
            let spec = command.spec();
            let named = if spec.name.contains('|') { format!("{}|{}", words[0], words[1]) } else { words[0].clone() };
            assert_eq!(spec.name, named, "{sample}");
            covered.insert(spec.name);
        }
        for spec in COMMANDS.iter().chain(COMMANDS.iter().flat_map(|spec| spec.subcommands)) {
            // CLIENT alone is only an arity error.
            let not_a_variant = spec.name == "client";
            assert!(covered.contains(spec.name) || not_a_variant, "no sample for {}", spec.name);
        }
    }

    #[test]
    fn client_setinfo_takes_a_library_name_and_version_as_redis_7_2_does() {
        let lib = |attr, v: &str| Ok(Command::ClientSetInfo { attr, value: b(v) });
        assert_eq!(parse("CLIENT SETINFO LIB-NAME redis-py(flotilla)"), lib(ClientAttr::LibName, "redis-py(flotilla)"));
        assert_eq!(parse("client setinfo lib-ver 5.2.1"), lib(ClientAttr::LibVer, "5.2.1"));
        assert_eq!(parse("CLIENT SETINFO lib-colour red"), Err("ERR Unrecognized option 'lib-colour'".into()));
        assert_eq!(
            Command::parse(&[b("CLIENT"), b("SETINFO"), b("LIB-NAME"), b("two words")]).map_err(|e| e.to_string()),
            Err("ERR lib-name cannot contain spaces, newlines or special characters.".into())
        );
        assert_eq!(
            parse("CLIENT SETINFO lib-name"),
            Err("ERR wrong number of arguments for 'client|setinfo' command".into())
        );
    }

    #[test]
    fn names_are_case_insensitive() {
        assert_eq!(parse("gEt k"), Ok(Command::Get { key: b("k") }));
        assert_eq!(parse("client setNAME x"), Ok(Command::ClientSetName { name: b("x") }));
    }

    #[test]
    fn unknown_commands_and_subcommands() {
        assert_eq!(parse("foo a b"), Err("ERR unknown command 'foo', with args beginning with: 'a' 'b' ".into()));
        assert_eq!(parse("CLIENT kill x"), Err("ERR unknown subcommand 'kill'. Try CLIENT HELP.".into()));
        assert_eq!(parse("command list"), Err("ERR unknown subcommand 'list'. Try COMMAND HELP.".into()));
        assert!(Command::parse(&[]).is_err());
    }

    #[test]
    fn arity_errors_name_the_command_as_redis_does() {
        for (request, name) in [
            ("GET", "get"),
            ("GET a b", "get"),
            ("SET k", "set"),
            ("PING a b", "ping"),
            ("CLIENT", "client"),
            ("CLIENT SETNAME", "client|setname"),
            ("CLIENT GETNAME x", "client|getname"),
            ("COMMAND COUNT x", "command|count"),
            ("MSET a", "mset"),
            ("MSET a b c", "mset"),
            ("MSETNX a b c", "msetnx"),
            ("DBSIZE x", "dbsize"),
            ("DEL", "del"),
        ] {
            assert_eq!(parse(request), Err(format!("ERR wrong number of arguments for '{name}' command")), "{request}");
        }
    }

    #[test]
    fn set_options() {
        let set = |condition, get, expiry| Command::Set { key: b("k"), value: b("v"), condition, get, expiry };
        assert_eq!(parse("SET k v"), Ok(set(None, false, None)));
        assert_eq!(parse("SET k v nx GET"), Ok(set(Some(SetCondition::IfMissing), true, None)));
        assert_eq!(parse("SET k v XX xx"), Ok(set(Some(SetCondition::IfExists), false, None)));
        assert_eq!(parse("SET k v EX 10"), Ok(set(None, false, Some(Expiry::Seconds(10)))));
        assert_eq!(parse("SET k v px 5 PX 7"), Ok(set(None, false, Some(Expiry::Milliseconds(7)))));
        assert_eq!(parse("SET k v EXAT 1700000000"), Ok(set(None, false, Some(Expiry::AtSeconds(1700000000)))));
        assert_eq!(parse("SET k v PXAT 1"), Ok(set(None, false, Some(Expiry::AtMilliseconds(1)))));
        assert_eq!(parse("SET k v KEEPTTL GET"), Ok(set(None, true, Some(Expiry::KeepTtl))));
        for request in [
            "SET k v NX XX",
            "SET k v XX NX",
            "SET k v EX 1 PX 1",
            "SET k v KEEPTTL EX 1",
            "SET k v EX",
            "SET k v FOO",
            "SET k v EX x FOO",
        ] {
            assert_eq!(parse(request), Err(error::SYNTAX.into()), "{request}");
        }
        assert_eq!(parse("SET k v EX x"), Err(error::NOT_AN_INTEGER.into()));
        assert_eq!(parse("SET k v EX 1.5"), Err(error::NOT_AN_INTEGER.into()));
        for request in ["SET k v EX 0", "SET k v PX -1", "SET k v EX 9223372036854776", "SET k v EXAT 0"] {
            assert_eq!(parse(request), Err("ERR invalid expire time in 'set' command".into()), "{request}");
        }
        assert_eq!(parse("SET k v PX 9223372036854775807"), Ok(set(None, false, Some(Expiry::Milliseconds(i64::MAX)))));
    }

    #[test]
    fn counters() {
        assert_eq!(parse("INCR k"), Ok(Command::Incr { key: b("k") }));
        assert_eq!(parse("DECRBY k -5"), Ok(Command::DecrBy { key: b("k"), decrement: -5 }));
        let deltas: Vec<Option<i64>> = ["INCR k", "DECR k", "INCRBY k -5", "DECRBY k -5", "GET k"]
            .into_iter()
            .map(|request| parse(request).unwrap().counter_delta().map(|(_, delta)| delta))
            .collect();
        assert_eq!(deltas, [Some(1), Some(-1), Some(-5), Some(5), None]);
        assert_eq!(parse("DECRBY k 9223372036854775807").unwrap().counter_delta().map(|(_, d)| d), Some(-i64::MAX));
        assert_eq!(parse("DECRBY k -9223372036854775808"), Err("ERR decrement would overflow".into()));
        assert_eq!(parse("INCRBY k 1.0"), Err(error::NOT_AN_INTEGER.into()));
        assert_eq!(parse("INCRBY k 007"), Err(error::NOT_AN_INTEGER.into()));
        assert_eq!(parse("INCRBYFLOAT k 2.5e3"), Ok(Command::IncrByFloat { key: b("k"), delta: 2500.0 }));
        assert_eq!(parse("INCRBYFLOAT k abc"), Err("ERR value is not a valid float".into()));
        assert_eq!(parse("INCRBYFLOAT k nan"), Err("ERR value is not a valid float".into()));
    }

    #[test]
    fn multi_key_commands() {
        assert_eq!(parse("MGET a b a"), Ok(Command::MGet { keys: vec![b("a"), b("b"), b("a")] }));
        assert_eq!(parse("MSET a 1 b 2"), Ok(Command::MSet { pairs: vec![(b("a"), b("1")), (b("b"), b("2"))] }));
        let del = parse("DEL a b").unwrap();
        assert_eq!(del.keys(), [&b("a"), &b("b")]);
        assert_eq!(parse("MSETNX a 1 b 2").unwrap().keys(), [&b("a"), &b("b")]);
        assert_eq!(parse("SET k v EX 1").unwrap().keys(), [&b("k")]);
        assert!(parse("PING").unwrap().keys().is_empty());
    }

    #[test]
    fn scan_options() {
        let scan = |cursor, pattern: Option<&str>, count, type_name: Option<&str>| Command::Scan {
            cursor,
            pattern: pattern.map(b),
            count,
            type_name: type_name.map(b),
        };
        assert_eq!(parse("SCAN 0"), Ok(scan(0, None, None, None)));
        assert_eq!(
            parse("SCAN 18446744073709551615 match user:* COUNT 100 type string"),
            Ok(scan(u64::MAX, Some("user:*"), Some(100), Some("string")))
        );
        assert_eq!(parse("SCAN 5 MATCH *"), Ok(scan(5, None, None, None)));
        assert_eq!(parse("SCAN x"), Err("ERR invalid cursor".into()));
        assert_eq!(parse("SCAN -1"), Err("ERR invalid cursor".into()));
        assert_eq!(parse("SCAN 18446744073709551616"), Err("ERR invalid cursor".into()));
        assert_eq!(parse("SCAN 0 COUNT 0"), Err(error::SYNTAX.into()));
        assert_eq!(parse("SCAN 0 COUNT x"), Err(error::NOT_AN_INTEGER.into()));
        assert_eq!(parse("SCAN 0 COUNT"), Err(error::SYNTAX.into()));
        assert_eq!(parse("SCAN 0 FOO bar"), Err(error::SYNTAX.into()));
    }

    #[test]
    fn connection_commands() {
        assert_eq!(parse("PING"), Ok(Command::Ping { message: None }));
        assert_eq!(parse("AUTH a b c"), Err(error::SYNTAX.into()));
        assert_eq!(parse("AUTH pw"), Ok(Command::Auth(Credentials { username: None, password: b("pw") })));
        assert_eq!(parse("SELECT 15"), Ok(Command::Select { db: 15 }));
        assert_eq!(parse("SELECT x"), Err(error::NOT_AN_INTEGER.into()));
        assert_eq!(parse("SELECT 2147483648"), Err(error::NOT_AN_INTEGER.into()));
        assert_eq!(parse("QUIT now"), Ok(Command::Quit));
        assert_eq!(parse("CLIENT SETNAME a\tb"), Err(error::INVALID_CLIENT_NAME.into()));
        assert_eq!(
            Command::parse(&[b("CLIENT"), b("SETNAME"), Bytes::new()]),
            Ok(Command::ClientSetName { name: Bytes::new() })
        );
        assert_eq!(parse("FLUSHALL async"), Ok(Command::FlushAll(FlushMode::Async)));
        assert_eq!(parse("FLUSHDB SYNC"), Ok(Command::FlushDb(FlushMode::Sync)));
        assert_eq!(parse("FLUSHDB now"), Err(error::SYNTAX.into()));
        assert_eq!(parse("FLUSHDB SYNC SYNC"), Err(error::SYNTAX.into()));
    }

    #[test]
    fn hello_follows_redis() {
        assert_eq!(parse("HELLO"), Ok(Command::Hello { protocol: None, auth: None, client_name: None }));
        assert_eq!(
            parse("HELLO 2 auth user pw SETNAME me"),
            Ok(Command::Hello {
                protocol: Some(Protocol::Resp2),
                auth: Some(Credentials { username: Some(b("user")), password: b("pw") }),
                client_name: Some(b("me")),
            })
        );
        assert_eq!(parse("HELLO x"), Err("ERR Protocol version is not an integer or out of range".into()));
        assert_eq!(parse("HELLO 4 AUTH"), Err("NOPROTO unsupported protocol version".into()));
        assert_eq!(parse("HELLO 3 AUTH user"), Err("ERR Syntax error in HELLO option 'AUTH'".into()));
        assert_eq!(parse("HELLO 3 SETNAME"), Err("ERR Syntax error in HELLO option 'SETNAME'".into()));
        assert_eq!(parse("HELLO 3 SETNAME a\nb"), Err(error::INVALID_CLIENT_NAME.into()));
    }

    #[test]
    fn debug_output_leaves_passwords_out() {
        for line in ["AUTH hunter2-secret", "AUTH app hunter2-secret", "HELLO 3 AUTH app hunter2-secret"] {
            let command = Command::parse(&args(line)).expect(line);
            let shown = format!("{command:?} {command:#?}");
            assert!(!shown.contains("hunter2"), "{line}: {shown}");
            assert!(shown.contains("<redacted>"), "{line}: {shown}");
        }
        let named = format!("{:?}", parse("AUTH app hunter2-secret").unwrap());
        assert!(named.contains("app"), "the user name is still shown: {named}");
    }

    #[test]
    fn command_introspection_requests() {
        assert_eq!(parse("COMMAND"), Ok(Command::CommandAll));
        assert_eq!(parse("COMMAND DOCS get set"), Ok(Command::CommandDocs { names: vec![b("get"), b("set")] }));
        assert_eq!(parse("COMMAND INFO"), Ok(Command::CommandInfo { names: vec![] }));
        assert_eq!(parse("INFO server clients"), Ok(Command::Info { sections: vec![b("server"), b("clients")] }));
    }

    #[test]
    fn resolve_reports_the_subcommand_spec() {
        assert_eq!(resolve(&args("client setname x")).map(|s| s.name), Ok("client|setname"));
        assert_eq!(resolve(&args("command")).map(|s| s.name), Ok("command"));
    }
}
