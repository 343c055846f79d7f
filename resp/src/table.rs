//! The command table: every command the front door knows, with what Redis says about it.
//!
//! Arity follows Redis's convention (counting the command name: `n` means exactly `n`
//! arguments, `-n` at least `n`), and so do the key positions (first, last, step; a
//! negative last counts from the end), so that the values can be handed to clients by
//! `COMMAND` unchanged and a cluster-aware client computes the same keys as we do. The
//! documentation fields (summary, since, arguments) exist for `COMMAND DOCS`, from which
//! redis-cli builds its hints and `HELP`.

use std::ops::BitOr;

/// What a command does, for routing and for `COMMAND INFO`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(u16);

impl Flags {
    /// No flags.
    pub const NONE: Flags = Flags(0);
    /// Reads keys and changes nothing: a follower may serve it under `READONLY`.
    pub const READONLY: Flags = Flags(1);
    /// May change keys: goes through the shard's Raft log.
    pub const WRITE: Flags = Flags(1 << 1);
    /// May grow memory (Redis refuses these when out of memory).
    pub const DENYOOM: Flags = Flags(1 << 2);
    /// O(1) or O(log N): never slow.
    pub const FAST: Flags = Flags(1 << 3);
    /// Administrative and dangerous.
    pub const ADMIN: Flags = Flags(1 << 4);
    /// Allowed before the connection has authenticated.
    pub const NO_AUTH: Flags = Flags(1 << 5);
    /// Answered by the connection itself: about the connection or the server, touches no
    /// key and no shard. (Ours, not Redis's: `COMMAND INFO` shows it as the `@connection`
    /// category.)
    pub const CONNECTION: Flags = Flags(1 << 6);

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets of flags.
    pub const fn with(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }

    /// The names `COMMAND INFO` lists, in Redis's order.
    pub fn redis_names(self) -> Vec<&'static str> {
        [
            (Flags::WRITE, "write"),
            (Flags::READONLY, "readonly"),
            (Flags::DENYOOM, "denyoom"),
            (Flags::ADMIN, "admin"),
            (Flags::FAST, "fast"),
            (Flags::NO_AUTH, "no_auth"),
        ]
        .into_iter()
        .filter(|&(flag, _)| self.contains(flag))
        .map(|(_, name)| name)
        .collect()
    }
}

impl BitOr for Flags {
    type Output = Flags;

    fn bitor(self, other: Flags) -> Flags {
        self.with(other)
    }
}

/// What kind of value an argument takes, in `COMMAND DOCS`'s terms.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// A key name.
    Key,
    /// Any string.
    String,
    /// An integer.
    Integer,
    /// A floating point number.
    Double,
    /// A glob-style pattern.
    Pattern,
    /// A Unix time (seconds or milliseconds).
    UnixTime,
    /// The token alone, no value (`NX`).
    PureToken,
    /// Exactly one of the arguments listed.
    OneOf(&'static [Arg]),
    /// The arguments listed, in order.
    Block(&'static [Arg]),
}

impl ArgKind {
    /// The name `COMMAND DOCS` gives the kind.
    pub fn redis_name(self) -> &'static str {
        match self {
            ArgKind::Key => "key",
            ArgKind::String => "string",
            ArgKind::Integer => "integer",
            ArgKind::Double => "double",
            ArgKind::Pattern => "pattern",
            ArgKind::UnixTime => "unix-time",
            ArgKind::PureToken => "pure-token",
            ArgKind::OneOf(_) => "oneof",
            ArgKind::Block(_) => "block",
        }
    }
}

/// One argument in a command's documentation.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Arg {
    /// Its name in the docs (`seconds`).
    pub name: &'static str,
    /// What it takes.
    pub kind: ArgKind,
    /// The keyword before the value (`EX`), if any.
    pub token: Option<&'static str>,
    /// May be left out.
    pub optional: bool,
    /// May be repeated.
    pub multiple: bool,
}

impl Arg {
    const fn new(name: &'static str, kind: ArgKind) -> Arg {
        Arg { name, kind, token: None, optional: false, multiple: false }
    }

    const fn token(self, token: &'static str) -> Arg {
        Arg { token: Some(token), ..self }
    }

    const fn optional(self) -> Arg {
        Arg { optional: true, ..self }
    }

    const fn multiple(self) -> Arg {
        Arg { multiple: true, ..self }
    }
}

/// Everything the table knows about one command or subcommand.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CommandSpec {
    /// Lower case; a subcommand is `container|sub` (`client|setname`), as in Redis 7.
    pub name: &'static str,
    /// Redis's arity: `n` exactly `n` arguments, `-n` at least `n`, the name included.
    pub arity: i32,
    /// What it does.
    pub flags: Flags,
    /// Position of the first key argument, 0 if none.
    pub first_key: i32,
    /// Position of the last key argument; negative counts from the end (-1: the last).
    pub last_key: i32,
    /// Distance between key arguments (2 for `MSET key value key value`).
    pub key_step: i32,
    /// Redis's documentation group (`string`, `generic`, `connection`, `server`, ...).
    pub group: &'static str,
    /// ACL categories beyond those the flags imply (`@string`, `@keyspace`, ...).
    pub categories: &'static [&'static str],
    /// One line on what it does.
    pub summary: &'static str,
    /// The Redis version that introduced it.
    pub since: &'static str,
    /// Its time complexity.
    pub complexity: &'static str,
    /// Its arguments after the name (after the subcommand for a subcommand).
    pub args: &'static [Arg],
    /// A container's subcommands (`CLIENT`, `COMMAND`); empty for the others.
    pub subcommands: &'static [CommandSpec],
}

impl CommandSpec {
    /// Whether `argc` arguments (the name included) fit the arity.
    pub fn arity_allows(&self, argc: usize) -> bool {
        let Ok(argc) = i64::try_from(argc) else { return false };
        let arity = i64::from(self.arity);
        if arity >= 0 {
            argc == arity
        } else {
            argc >= -arity
        }
    }

    /// The subcommand's own name, after the `|` (`setname`); the name for a command.
    pub fn short_name(&self) -> &'static str {
        self.name.rsplit('|').next().unwrap_or(self.name)
    }

    /// Whether it has subcommands.
    pub fn is_container(&self) -> bool {
        !self.subcommands.is_empty()
    }

    /// The subcommand named `name` (any case), for a container.
    pub fn subcommand(&self, name: &[u8]) -> Option<&'static CommandSpec> {
        self.subcommands.iter().find(|sub| sub.short_name().as_bytes().eq_ignore_ascii_case(name))
    }

    /// Its ACL categories as `COMMAND INFO` lists them: the implied ones and the table's,
    /// in Redis's order.
    pub fn acl_categories(&self) -> Vec<&'static str> {
        let implied = |category: &str| match category {
            "@read" => self.flags.contains(Flags::READONLY),
            "@write" => self.flags.contains(Flags::WRITE),
            "@admin" => self.flags.contains(Flags::ADMIN),
            "@fast" => self.flags.contains(Flags::FAST),
            "@slow" => !self.flags.contains(Flags::FAST),
            "@dangerous" => self.flags.contains(Flags::ADMIN),
            "@connection" => self.flags.contains(Flags::CONNECTION),
            _ => false,
        };
        ["@keyspace", "@read", "@write", "@string", "@admin", "@fast", "@slow", "@dangerous", "@connection"]
            .into_iter()
            .filter(|&category| implied(category) || self.categories.contains(&category))
            .collect()
    }
}

/// The top-level command named `name`, in any case.
pub fn spec(name: &[u8]) -> Option<&'static CommandSpec> {
    COMMANDS.iter().find(|spec| spec.name.as_bytes().eq_ignore_ascii_case(name))
}

/// The command or subcommand with this full name (`get`, `client|setname`), in any case.
pub fn spec_by_full_name(name: &[u8]) -> Option<&'static CommandSpec> {
    match name.iter().position(|&b| b == b'|') {
        None => spec(name),
        Some(bar) => spec(&name[..bar])?.subcommand(&name[bar + 1..]),
    }
}

const fn command(name: &'static str, arity: i32, flags: Flags, group: &'static str) -> CommandSpec {
    CommandSpec {
        name,
        arity,
        flags,
        first_key: 0,
        last_key: 0,
        key_step: 0,
        group,
        categories: &[],
        summary: "",
        since: "",
        complexity: "O(1)",
        args: &[],
        subcommands: &[],
    }
}

impl CommandSpec {
    const fn keys(self, first_key: i32, last_key: i32, key_step: i32) -> CommandSpec {
        CommandSpec { first_key, last_key, key_step, ..self }
    }

    const fn doc(self, summary: &'static str, since: &'static str) -> CommandSpec {
        CommandSpec { summary, since, ..self }
    }

    const fn complexity(self, complexity: &'static str) -> CommandSpec {
        CommandSpec { complexity, ..self }
    }

    const fn args(self, args: &'static [Arg]) -> CommandSpec {
        CommandSpec { args, ..self }
    }

    const fn categories(self, categories: &'static [&'static str]) -> CommandSpec {
        CommandSpec { categories, ..self }
    }

    const fn subcommands(self, subcommands: &'static [CommandSpec]) -> CommandSpec {
        CommandSpec { subcommands, ..self }
    }
}

const READ_FAST: Flags = Flags::READONLY.with(Flags::FAST);
const WRITE_GROW: Flags = Flags::WRITE.with(Flags::DENYOOM);
const WRITE_GROW_FAST: Flags = WRITE_GROW.with(Flags::FAST);
const CONN: Flags = Flags::CONNECTION;
const CONN_FAST: Flags = Flags::CONNECTION.with(Flags::FAST);
const CONN_NO_AUTH: Flags = CONN_FAST.with(Flags::NO_AUTH);

const STRING: &[&str] = &["@string"];
const KEYSPACE: &[&str] = &["@keyspace"];

const KEY: Arg = Arg::new("key", ArgKind::Key);
const KEYS: Arg = KEY.multiple();
const VALUE: Arg = Arg::new("value", ArgKind::String);
const COMMAND_NAMES: Arg = Arg::new("command-name", ArgKind::String).optional().multiple();
const FLUSH_TYPE: Arg = Arg::new(
    "flush-type",
    ArgKind::OneOf(&[
        Arg::new("async", ArgKind::PureToken).token("ASYNC"),
        Arg::new("sync", ArgKind::PureToken).token("SYNC"),
    ]),
)
.optional();
const KEY_VALUE_PAIRS: Arg = Arg::new("data", ArgKind::Block(&[KEY, VALUE])).multiple();

/// The subcommands of `CLIENT`.
const CLIENT_SUBCOMMANDS: &[CommandSpec] = &[
    command("client|getname", 2, CONN, "connection").doc("Returns the name of the connection.", "2.6.9"),
    command("client|help", 2, CONN, "connection").doc("Returns helpful text about the different subcommands.", "5.0.0"),
    command("client|id", 2, CONN, "connection").doc("Returns the unique client ID of the connection.", "5.0.0"),
    command("client|info", 2, CONN, "connection").doc("Returns information about the connection.", "6.2.0"),
    command("client|setname", 3, CONN, "connection")
        .doc("Sets the connection name.", "2.6.9")
        .args(&[Arg::new("connection-name", ArgKind::String)]),
    command("client|setinfo", 4, CONN, "connection")
        .doc("Sets information specific to the client or connection.", "7.2.0")
        .args(&[Arg::new(
            "attr",
            ArgKind::OneOf(&[
                Arg::new("libname", ArgKind::String).token("LIB-NAME"),
                Arg::new("libver", ArgKind::String).token("LIB-VER"),
            ]),
        )]),
];

/// The subcommands of `COMMAND`.
const COMMAND_SUBCOMMANDS: &[CommandSpec] = &[
    command("command|count", 2, CONN, "server").doc("Returns a count of commands.", "2.8.13"),
    command("command|docs", -2, CONN, "server")
        .doc("Returns documentary information about one, multiple or all commands.", "7.0.0")
        .complexity("O(N) where N is the number of commands to look up")
        .args(&[COMMAND_NAMES]),
    command("command|help", 2, CONN, "server").doc("Returns helpful text about the different subcommands.", "5.0.0"),
    command("command|info", -2, CONN, "server")
        .doc("Returns information about one, multiple or all commands.", "2.8.13")
        .complexity("O(N) where N is the number of commands to look up")
        .args(&[COMMAND_NAMES]),
];

/// Every command the front door knows, in alphabetical order.
pub static COMMANDS: &[CommandSpec] = &[
    command("append", 3, WRITE_GROW_FAST, "string")
        .keys(1, 1, 1)
        .categories(STRING)
        .doc("Appends a string to the value of a key. Creates the key if it doesn't exist.", "2.0.0")
        .args(&[KEY, VALUE]),
    command("auth", -2, CONN_NO_AUTH, "connection")
        .doc("Authenticates the connection.", "1.0.0")
        .complexity("O(N) where N is the number of passwords defined for the user")
        .args(&[Arg::new("username", ArgKind::String).optional(), Arg::new("password", ArgKind::String)]),
    command("client", -2, CONN, "connection")
        .doc("A container for client connection commands.", "2.4.0")
        .complexity("Depends on subcommand.")
        .subcommands(CLIENT_SUBCOMMANDS),
    command("command", -1, CONN, "server")
        .doc("Returns detailed information about all commands.", "2.8.13")
        .complexity("O(N) where N is the total number of commands")
        .subcommands(COMMAND_SUBCOMMANDS),
    command("dbsize", 1, READ_FAST, "server").categories(KEYSPACE).doc("Returns the number of keys in the database.", "1.0.0"),
    command("decr", 2, WRITE_GROW_FAST, "string")
        .keys(1, 1, 1)
        .categories(STRING)
        .doc("Decrements the integer value of a key by one. Uses 0 as initial value if the key doesn't exist.", "1.0.0")
        .args(&[KEY]),
    command("decrby", 3, WRITE_GROW_FAST, "string")
        .keys(1, 1, 1)
        .categories(STRING)
        .doc("Decrements a number from the integer value of a key. Uses 0 as initial value if the key doesn't exist.", "1.0.0")
        .args(&[KEY, Arg::new("decrement", ArgKind::Integer)]),
    command("del", -2, Flags::WRITE, "generic")
        .keys(1, -1, 1)
        .categories(KEYSPACE)
        .doc("Deletes one or more keys.", "1.0.0")
        .complexity("O(N) where N is the number of keys that will be removed")
        .args(&[KEYS]),
    command("echo", 2, CONN_FAST, "connection").doc("Returns the given string.", "1.0.0").args(&[Arg::new("message", ArgKind::String)]),
    command("exists", -2, READ_FAST, "generic")
        .keys(1, -1, 1)
        .categories(KEYSPACE)
        .doc("Determines whether one or more keys exist.", "1.0.0")
        .complexity("O(N) where N is the number of keys to check")
        .args(&[KEYS]),
    command("flushall", -1, Flags::WRITE, "server")
        .categories(&["@keyspace", "@dangerous"])
        .doc("Removes all keys from all databases.", "1.0.0")
        .complexity("O(N) where N is the total number of keys in all databases")
        .args(&[FLUSH_TYPE]),
    command("flushdb", -1, Flags::WRITE, "server")
        .categories(&["@keyspace", "@dangerous"])
        .doc("Remove all keys from the current database.", "1.0.0")
        .complexity("O(N) where N is the number of keys in the selected database")
        .args(&[FLUSH_TYPE]),
    command("get", 2, READ_FAST, "string")
        .keys(1, 1, 1)
        .categories(STRING)
        .doc("Returns the string value of a key.", "1.0.0")
        .args(&[KEY]),
    command("getdel", 2, Flags::WRITE.with(Flags::FAST), "string")
        .keys(1, 1, 1)
        .categories(STRING)
        .doc("Returns the string value of a key after deleting the key.", "6.2.0")
        .args(&[KEY]),
    command("getset", 3, WRITE_GROW_FAST, "string")
        .keys(1, 1, 1)
        .categories(STRING)
        .doc("Returns the previous string value of a key after setting it to a new value.", "1.0.0")
        .args(&[KEY, VALUE]),
    command("hello", -1, CONN_NO_AUTH, "connection").doc("Handshakes with the Redis server.", "6.0.0").args(&[Arg::new(
        "arguments",
        ArgKind::Block(&[
            Arg::new("protover", ArgKind::Integer),
            Arg::new(
                "auth",
                ArgKind::Block(&[Arg::new("username", ArgKind::String), Arg::new("password", ArgKind::String)]),
            )
            .token("AUTH")
            .optional(),
            Arg::new("clientname", ArgKind::String).token("SETNAME").optional(),
        ]),
    )
    .optional()]),
    command("incr", 2, WRITE_GROW_FAST, "string")
        .keys(1, 1, 1)
        .categories(STRING)
        .doc("Increments the integer value of a key by one. Uses 0 as initial value if the key doesn't exist.", "1.0.0")
        .args(&[KEY]),
    command("incrby", 3, WRITE_GROW_FAST, "string")
        .keys(1, 1, 1)
        .categories(STRING)
        .doc("Increments the integer value of a key by a number. Uses 0 as initial value if the key doesn't exist.", "1.0.0")
        .args(&[KEY, Arg::new("increment", ArgKind::Integer)]),
    command("incrbyfloat", 3, WRITE_GROW_FAST, "string")
        .keys(1, 1, 1)
        .categories(STRING)
        .doc(
            "Increment the floating point value of a key by a number. Uses 0 as initial value if the key doesn't exist.",
            "2.6.0",
        )
        .args(&[KEY, Arg::new("increment", ArgKind::Double)]),
    command("info", -1, CONN, "server")
        .categories(&["@dangerous"])
        .doc("Returns information and statistics about the server.", "1.0.0")
        .args(&[Arg::new("section", ArgKind::String).optional().multiple()]),
    command("keys", 2, Flags::READONLY, "generic")
        .categories(&["@keyspace", "@dangerous"])
        .doc("Returns all key names that match a pattern.", "1.0.0")
        .complexity("O(N) with N being the number of keys in the database")
        .args(&[Arg::new("pattern", ArgKind::Pattern)]),
    command("mget", -2, READ_FAST, "string")
        .keys(1, -1, 1)
        .categories(STRING)
        .doc("Atomically returns the string values of one or more keys.", "1.0.0")
        .complexity("O(N) where N is the number of keys to retrieve")
        .args(&[KEYS]),
    command("mset", -3, WRITE_GROW, "string")
        .keys(1, -1, 2)
        .categories(STRING)
        .doc("Atomically creates or modifies the string values of one or more keys.", "1.0.1")
        .complexity("O(N) where N is the number of keys to set")
        .args(&[KEY_VALUE_PAIRS]),
    command("msetnx", -3, WRITE_GROW, "string")
        .keys(1, -1, 2)
        .categories(STRING)
        .doc("Atomically modifies the string values of one or more keys only when all keys don't exist.", "1.0.1")
        .complexity("O(N) where N is the number of keys to set")
        .args(&[KEY_VALUE_PAIRS]),
    command("ping", -1, CONN_FAST, "connection")
        .doc("Returns the server's liveliness response.", "1.0.0")
        .args(&[Arg::new("message", ArgKind::String).optional()]),
    command("quit", -1, CONN_NO_AUTH, "connection").doc("Closes the connection.", "1.0.0"),
    command("readonly", 1, CONN_FAST, "cluster")
        .doc("Enables read-only queries for a connection to a cluster replica node.", "3.0.0"),
    command("readwrite", 1, CONN_FAST, "cluster")
        .doc("Enables read-write queries for a connection to a cluster replica node.", "3.0.0"),
    command("scan", -2, Flags::READONLY, "generic")
        .categories(KEYSPACE)
        .doc("Iterates over the key names in the database.", "2.8.0")
        .complexity("O(1) for every call. O(N) for a complete iteration, including enough command calls for the cursor to return back to 0. N is the number of elements inside the collection.")
        .args(&[
            Arg::new("cursor", ArgKind::Integer),
            Arg::new("pattern", ArgKind::Pattern).token("MATCH").optional(),
            Arg::new("count", ArgKind::Integer).token("COUNT").optional(),
            Arg::new("type", ArgKind::String).token("TYPE").optional(),
        ]),
    command("select", 2, CONN_FAST, "connection")
        .doc("Changes the selected database.", "1.0.0")
        .args(&[Arg::new("index", ArgKind::Integer)]),
    command("set", -3, WRITE_GROW, "string")
        .keys(1, 1, 1)
        .categories(STRING)
        .doc("Sets the string value of a key, ignoring its type. The key is created if it doesn't exist.", "1.0.0")
        .args(&[
            KEY,
            VALUE,
            Arg::new(
                "condition",
                ArgKind::OneOf(&[Arg::new("nx", ArgKind::PureToken).token("NX"), Arg::new("xx", ArgKind::PureToken).token("XX")]),
            )
            .optional(),
            Arg::new("get", ArgKind::PureToken).token("GET").optional(),
            Arg::new(
                "expiration",
                ArgKind::OneOf(&[
                    Arg::new("seconds", ArgKind::Integer).token("EX"),
                    Arg::new("milliseconds", ArgKind::Integer).token("PX"),
                    Arg::new("unix-time-seconds", ArgKind::UnixTime).token("EXAT"),
                    Arg::new("unix-time-milliseconds", ArgKind::UnixTime).token("PXAT"),
                    Arg::new("keepttl", ArgKind::PureToken).token("KEEPTTL"),
                ]),
            )
            .optional(),
        ]),
    command("setnx", 3, WRITE_GROW_FAST, "string")
        .keys(1, 1, 1)
        .categories(STRING)
        .doc("Set the string value of a key only when the key doesn't exist.", "1.0.0")
        .args(&[KEY, VALUE]),
    command("strlen", 2, READ_FAST, "string")
        .keys(1, 1, 1)
        .categories(STRING)
        .doc("Returns the length of a string value.", "2.2.0")
        .args(&[KEY]),
    command("time", 1, CONN_FAST, "server").doc("Returns the server time.", "2.6.0"),
    command("type", 2, READ_FAST, "generic")
        .keys(1, 1, 1)
        .categories(KEYSPACE)
        .doc("Determines the type of value stored at a key.", "1.0.0")
        .args(&[KEY]),
    command("unlink", -2, Flags::WRITE.with(Flags::FAST), "generic")
        .keys(1, -1, 1)
        .categories(KEYSPACE)
        .doc("Asynchronously deletes one or more keys.", "4.0.0")
        .complexity("O(1) for each key removed regardless of its size. Then the command does O(N) work in a different thread in order to reclaim memory, where N is the number of allocations the deleted objects where composed of.")
        .args(&[KEYS]),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_sorted_lowercase_and_complete() {
        let names: Vec<&str> = COMMANDS.iter().map(|spec| spec.name).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted);
        let expected = [
            "append",
            "auth",
            "client",
            "command",
            "dbsize",
            "decr",
            "decrby",
            "del",
            "echo",
            "exists",
            "flushall",
            "flushdb",
            "get",
            "getdel",
            "getset",
            "hello",
            "incr",
            "incrby",
            "incrbyfloat",
            "info",
            "keys",
            "mget",
            "mset",
            "msetnx",
            "ping",
            "quit",
            "readonly",
            "readwrite",
            "scan",
            "select",
            "set",
            "setnx",
            "strlen",
            "time",
            "type",
            "unlink",
        ];
        assert_eq!(names, expected);
        for spec in COMMANDS.iter().chain(COMMANDS.iter().flat_map(|spec| spec.subcommands)) {
            assert_eq!(spec.name, spec.name.to_ascii_lowercase());
            assert!(!spec.summary.is_empty() && !spec.since.is_empty(), "{} lacks docs", spec.name);
            assert_ne!(spec.arity, 0, "{}", spec.name);
            // Readonly and write exclude each other; keyed commands are one of them.
            assert!(!(spec.flags.contains(Flags::READONLY) && spec.flags.contains(Flags::WRITE)), "{}", spec.name);
            if spec.first_key > 0 {
                assert!(spec.flags.contains(Flags::READONLY) || spec.flags.contains(Flags::WRITE), "{}", spec.name);
                assert!(spec.key_step > 0, "{}", spec.name);
            }
        }
        for spec in COMMANDS.iter().filter(|spec| spec.is_container()) {
            for sub in spec.subcommands {
                assert!(sub.name.starts_with(&format!("{}|", spec.name)), "{}", sub.name);
                assert!(sub.arity >= 2 || sub.arity <= -2, "{}: the subcommand counts", sub.name);
            }
        }
    }

    #[test]
    fn key_positions_match_redis() {
        for (name, arity, keys) in [
            ("get", 2, (1, 1, 1)),
            ("set", -3, (1, 1, 1)),
            ("mset", -3, (1, -1, 2)),
            ("mget", -2, (1, -1, 1)),
            ("del", -2, (1, -1, 1)),
            ("scan", -2, (0, 0, 0)),
            ("ping", -1, (0, 0, 0)),
        ] {
            let spec = spec(name.as_bytes()).unwrap();
            assert_eq!((spec.arity, (spec.first_key, spec.last_key, spec.key_step)), (arity, keys), "{name}");
        }
    }

    #[test]
    fn lookup_ignores_case() {
        assert_eq!(spec(b"GeT").map(|s| s.name), Some("get"));
        assert_eq!(spec(b"gets"), None);
        assert_eq!(spec(b""), None);
        assert_eq!(spec_by_full_name(b"CLIENT|SetName").map(|s| s.name), Some("client|setname"));
        assert_eq!(spec_by_full_name(b"client|nope"), None);
        assert_eq!(spec_by_full_name(b"get|x"), None);
    }

    #[test]
    fn arity_follows_the_redis_convention() {
        let get = spec(b"get").unwrap();
        assert!(!get.arity_allows(1) && get.arity_allows(2) && !get.arity_allows(3));
        let set = spec(b"set").unwrap();
        assert!(!set.arity_allows(2) && set.arity_allows(3) && set.arity_allows(30));
    }

    #[test]
    fn categories_come_from_flags_and_the_table() {
        assert_eq!(spec(b"get").unwrap().acl_categories(), ["@read", "@string", "@fast"]);
        assert_eq!(spec(b"set").unwrap().acl_categories(), ["@write", "@string", "@slow"]);
        assert_eq!(spec(b"keys").unwrap().acl_categories(), ["@keyspace", "@read", "@slow", "@dangerous"]);
        assert_eq!(spec(b"ping").unwrap().acl_categories(), ["@fast", "@connection"]);
        assert_eq!(spec(b"set").unwrap().flags.redis_names(), ["write", "denyoom"]);
        assert_eq!(spec(b"hello").unwrap().flags.redis_names(), ["fast", "no_auth"]);
    }
}
