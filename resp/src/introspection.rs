//! The replies of `COMMAND`, `COMMAND COUNT|INFO|DOCS` and the `HELP` subcommands, built
//! from the table.
//!
//! redis-cli asks `COMMAND DOCS` once when it starts and builds its hints and `HELP` from
//! the answer. It asserts on the types it reads (a summary must be a bulk string, argument
//! flags simple strings, arguments an array), and a wrong type aborts the client, so the
//! shapes here are Redis 7's exactly. Key specifications (Redis 7's replacement for the
//! first/last/step triple) are sent empty: the triple describes every command we have.

use bytes::Bytes;

use crate::frame::Frame;
use crate::table::{self, Arg, ArgKind, CommandSpec, COMMANDS};

/// `COMMAND COUNT`: the number of top-level commands.
pub fn command_count() -> Frame {
    Frame::Integer(i64::try_from(COMMANDS.len()).unwrap_or(i64::MAX))
}

/// `COMMAND INFO [name ...]`, and `COMMAND` (no names: every command). An unknown name
/// gets a null in its place; `container|sub` names a subcommand.
pub fn command_info(names: &[Bytes]) -> Frame {
    if names.is_empty() {
        return Frame::Array(COMMANDS.iter().map(info).collect());
    }
    Frame::Array(names.iter().map(|name| table::spec_by_full_name(name).map_or(Frame::Null, info)).collect())
}

/// `COMMAND DOCS [name ...]`: a map from command name to its documentation; unknown names
/// are left out, no names means every command.
pub fn command_docs(names: &[Bytes]) -> Frame {
    let specs: Vec<&CommandSpec> = if names.is_empty() {
        COMMANDS.iter().collect()
    } else {
        names.iter().filter_map(|name| table::spec_by_full_name(name)).collect()
    };
    Frame::Map(specs.into_iter().map(|spec| (bulk(spec.name), docs(spec))).collect())
}

/// `CLIENT HELP`, `COMMAND HELP`: Redis's layout, a header line and two lines per
/// subcommand, as simple strings. `None` if `command` has no subcommands.
pub fn help(command: &str) -> Option<Frame> {
    let spec = table::spec(command.as_bytes()).filter(|spec| spec.is_container())?;
    let upper = spec.name.to_ascii_uppercase();
    let mut lines = vec![format!("{upper} <subcommand> [<arg> [value] [opt] ...]. Subcommands are:")];
    for sub in spec.subcommands {
        let usage = usage(sub.args);
        let name = sub.short_name().to_ascii_uppercase();
        lines.push(if usage.is_empty() { name } else { format!("{name} {usage}") });
        lines.push(format!("    {}", sub.summary));
    }
    Some(Frame::Array(lines.into_iter().map(|line| Frame::Simple(line.into())).collect()))
}

fn bulk(text: &'static str) -> Frame {
    Frame::Bulk(Bytes::from_static(text.as_bytes()))
}

fn simple(text: &'static str) -> Frame {
    Frame::Simple(Bytes::from_static(text.as_bytes()))
}

fn info(spec: &CommandSpec) -> Frame {
    Frame::Array(vec![
        bulk(spec.name),
        Frame::Integer(spec.arity.into()),
        Frame::Set(spec.flags.redis_names().into_iter().map(simple).collect()),
        Frame::Integer(spec.first_key.into()),
        Frame::Integer(spec.last_key.into()),
        Frame::Integer(spec.key_step.into()),
        Frame::Set(spec.acl_categories().into_iter().map(simple).collect()),
        // Tips and key specifications.
        Frame::Set(Vec::new()),
        Frame::Array(Vec::new()),
        Frame::Array(spec.subcommands.iter().map(info).collect()),
    ])
}

fn docs(spec: &CommandSpec) -> Frame {
    let mut fields = vec![
        (bulk("summary"), bulk(spec.summary)),
        (bulk("since"), bulk(spec.since)),
        (bulk("group"), bulk(spec.group)),
        (bulk("complexity"), bulk(spec.complexity)),
    ];
    if !spec.args.is_empty() {
        fields.push((bulk("arguments"), Frame::Array(spec.args.iter().map(arg_docs).collect())));
    }
    if spec.is_container() {
        let subs = spec.subcommands.iter().map(|sub| (bulk(sub.name), docs(sub))).collect();
        fields.push((bulk("subcommands"), Frame::Map(subs)));
    }
    Frame::Map(fields)
}

fn arg_docs(arg: &Arg) -> Frame {
    let mut fields = vec![(bulk("name"), bulk(arg.name)), (bulk("type"), bulk(arg.kind.redis_name()))];
    let children = match arg.kind {
        ArgKind::OneOf(children) | ArgKind::Block(children) => Some(children),
        ArgKind::PureToken => None,
        _ => {
            fields.push((bulk("display_text"), bulk(arg.name)));
            None
        }
    };
    if let Some(token) = arg.token {
        fields.push((bulk("token"), bulk(token)));
    }
    let flags: Vec<Frame> = [(arg.optional, "optional"), (arg.multiple, "multiple")]
        .into_iter()
        .filter(|&(set, _)| set)
        .map(|(_, flag)| simple(flag))
        .collect();
    if !flags.is_empty() {
        fields.push((bulk("flags"), Frame::Set(flags)));
    }
    if let Some(children) = children {
        fields.push((bulk("arguments"), Frame::Array(children.iter().map(arg_docs).collect())));
    }
    Frame::Map(fields)
}

/// The argument synopsis redis-cli would show: `key value [NX|XX] [GET] ...`.
pub fn usage(args: &[Arg]) -> String {
    args.iter().map(arg_usage).collect::<Vec<_>>().join(" ")
}

fn arg_usage(arg: &Arg) -> String {
    let value = match arg.kind {
        ArgKind::PureToken => String::new(),
        ArgKind::OneOf(children) => children.iter().map(arg_usage).collect::<Vec<_>>().join("|"),
        ArgKind::Block(children) => usage(children),
        _ => arg.name.to_owned(),
    };
    let once = match (arg.token, value.is_empty()) {
        (Some(token), true) => token.to_owned(),
        (Some(token), false) => format!("{token} {value}"),
        (None, _) => value,
    };
    let repeated = if arg.multiple { format!("{once} [{once} ...]") } else { once };
    if arg.optional {
        format!("[{repeated}]")
    } else {
        repeated
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Protocol;

    fn text(frame: &Frame) -> &[u8] {
        match frame {
            Frame::Bulk(text) | Frame::Simple(text) => text,
            other => panic!("not a string: {other:?}"),
        }
    }

    fn field<'a>(map: &'a Frame, key: &str) -> Option<&'a Frame> {
        let Frame::Map(pairs) = map else { panic!("not a map: {map:?}") };
        pairs.iter().find(|(k, _)| text(k) == key.as_bytes()).map(|(_, v)| v)
    }

    /// What redis-cli's help initialization asserts about one argument.
    fn check_arg_as_redis_cli_reads_it(arg: &Frame) {
        let Frame::Map(pairs) = arg else { panic!("argument is not a map: {arg:?}") };
        assert!(field(arg, "type").is_some(), "every argument has a type: {arg:?}");
        for (key, value) in pairs {
            match std::str::from_utf8(text(key)).unwrap() {
                "name" | "type" | "token" | "display_text" => assert!(matches!(value, Frame::Bulk(_)), "{value:?}"),
                "flags" => {
                    let Frame::Set(flags) = value else { panic!("flags not a set: {value:?}") };
                    assert!(flags.iter().all(|flag| matches!(flag, Frame::Simple(_))));
                }
                "arguments" => {
                    let Frame::Array(children) = value else { panic!("arguments not an array") };
                    children.iter().for_each(check_arg_as_redis_cli_reads_it);
                }
                other => panic!("unexpected argument field {other}"),
            }
        }
    }

    fn check_docs_as_redis_cli_reads_them(name: &[u8], docs: &Frame) {
        let Frame::Map(pairs) = docs else { panic!("docs are not a map") };
        for (key, value) in pairs {
            match std::str::from_utf8(text(key)).unwrap() {
                "summary" | "since" | "group" | "complexity" => assert!(matches!(value, Frame::Bulk(_))),
                "arguments" => {
                    let Frame::Array(args) = value else { panic!("arguments not an array") };
                    args.iter().for_each(check_arg_as_redis_cli_reads_it);
                }
                "subcommands" => {
                    let Frame::Map(subs) = value else { panic!("subcommands not a map") };
                    for (sub_name, sub_docs) in subs {
                        let sub_name = text(sub_name);
                        // redis-cli takes what follows the '|' as the subcommand's name.
                        assert!(sub_name.starts_with(name) && sub_name.get(name.len()) == Some(&b'|'));
                        check_docs_as_redis_cli_reads_them(sub_name, sub_docs);
                    }
                }
                other => panic!("unexpected docs field {other}"),
            }
        }
    }

    #[test]
    fn command_docs_has_the_shape_redis_cli_reads() {
        let Frame::Map(commands) = command_docs(&[]) else { panic!() };
        assert_eq!(commands.len(), COMMANDS.len());
        for (name, docs) in &commands {
            assert!(matches!(name, Frame::Bulk(_)));
            check_docs_as_redis_cli_reads_them(text(name), docs);
        }
        // Under RESP2 a map is a flat array of name, docs, name, docs...
        let wire = command_docs(&[Bytes::from_static(b"GET")]).to_bytes(Protocol::Resp2);
        assert!(wire.starts_with(b"*2\r\n$3\r\nget\r\n*10\r\n$7\r\nsummary\r\n"), "{}", wire.escape_ascii());
    }

    #[test]
    fn command_docs_leaves_out_unknown_names() {
        let docs = command_docs(&[Bytes::from_static(b"nope"), Bytes::from_static(b"client|id")]);
        let Frame::Map(commands) = docs else { panic!() };
        assert_eq!(commands.len(), 1);
        assert_eq!(text(&commands[0].0), b"client|id");
    }

    #[test]
    fn command_info_rows() {
        let info = command_info(&[Bytes::from_static(b"mset"), Bytes::from_static(b"nope")]);
        let expected = Frame::Array(vec![
            Frame::Array(vec![
                bulk("mset"),
                Frame::Integer(-3),
                Frame::Set(vec![simple("write"), simple("denyoom")]),
                Frame::Integer(1),
                Frame::Integer(-1),
                Frame::Integer(2),
                Frame::Set(vec![simple("@write"), simple("@string"), simple("@slow")]),
                Frame::Set(vec![]),
                Frame::Array(vec![]),
                Frame::Array(vec![]),
            ]),
            Frame::Null,
        ]);
        assert_eq!(info, expected);
        let Frame::Array(all) = command_info(&[]) else { panic!() };
        assert_eq!(all.len(), COMMANDS.len());
        let Frame::Array(client) = command_info(&[Bytes::from_static(b"CLIENT")]) else { panic!() };
        let Frame::Array(row) = &client[0] else { panic!() };
        let Frame::Array(subs) = &row[9] else { panic!() };
        assert_eq!(subs.len(), 6);
        assert_eq!(command_count(), Frame::Integer(36));
    }

    #[test]
    fn usage_lines_read_like_redis_docs() {
        let usage_of = |name: &str| usage(table::spec(name.as_bytes()).unwrap().args);
        assert_eq!(
            usage_of("set"),
            "key value [NX|XX] [GET] [EX seconds|PX milliseconds|EXAT unix-time-seconds|PXAT unix-time-milliseconds|KEEPTTL]"
        );
        assert_eq!(usage_of("mset"), "key value [key value ...]");
        assert_eq!(usage_of("scan"), "cursor [MATCH pattern] [COUNT count] [TYPE type]");
        assert_eq!(usage_of("hello"), "[protover [AUTH username password] [SETNAME clientname]]");
        assert_eq!(usage_of("del"), "key [key ...]");
    }

    #[test]
    fn help_lists_the_subcommands() {
        let Some(Frame::Array(lines)) = help("client") else { panic!() };
        let lines: Vec<&[u8]> = lines.iter().map(text).collect();
        assert_eq!(lines[0], b"CLIENT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:");
        assert!(lines.contains(&&b"SETNAME connection-name"[..]));
        assert!(lines.contains(&&b"    Sets the connection name."[..]));
        assert_eq!(help("get"), None);
    }
}
