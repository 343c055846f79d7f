//! Any argument vector types as a command or an error, never a panic; what parses maps to
//! the table entry the client named and fits its arity, and its keys are arguments of the
//! request.

use bytes::Bytes;
use flotilla_resp::table::COMMANDS;
use flotilla_resp::{Command, Frame, Protocol};
use proptest::prelude::*;

/// Command and subcommand names in random case, option tokens, numbers and junk.
fn token() -> impl Strategy<Value = Vec<u8>> {
    let mut words: Vec<&'static str> = COMMANDS.iter().map(|spec| spec.name).collect();
    words.extend(COMMANDS.iter().flat_map(|spec| spec.subcommands).map(|sub| sub.short_name()));
    words.extend([
        "NX",
        "XX",
        "GET",
        "EX",
        "PX",
        "EXAT",
        "PXAT",
        "KEEPTTL",
        "MATCH",
        "COUNT",
        "TYPE",
        "AUTH",
        "SETNAME",
        "ASYNC",
        "SYNC",
        "0",
        "1",
        "-1",
        "3",
        "007",
        "1.5",
        "inf",
        "nan",
        "9223372036854775807",
        "-9223372036854775808",
        "*",
        "",
    ]);
    prop_oneof![
        3 => (prop::sample::select(words), any::<u64>()).prop_map(|(word, case)| {
            word.bytes()
                .enumerate()
                .map(|(i, b)| if case >> (i % 64) & 1 == 1 { b.to_ascii_uppercase() } else { b })
                .collect()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..8),
    ]
}

proptest! {
    #[test]
    fn any_arguments_give_a_command_or_a_redis_error(args in prop::collection::vec(token(), 0..8)) {
        let args: Vec<Bytes> = args.into_iter().map(Bytes::from).collect();
        match Command::parse(&args) {
            Ok(command) => {
                let spec = command.spec();
                // The entry of the command (or subcommand) the client named.
                let lower = |arg: &Bytes| String::from_utf8_lossy(arg).to_ascii_lowercase();
                let named = match (&args[..], spec.name.contains('|')) {
                    ([name, sub, ..], true) => format!("{}|{}", lower(name), lower(sub)),
                    (args, _) => lower(&args[0]),
                };
                prop_assert_eq!(spec.name, named);
                prop_assert!(spec.arity_allows(args.len()), "{} with {} arguments", spec.name, args.len());
                for key in command.keys() {
                    prop_assert!(args.iter().skip(1).any(|arg| arg == key));
                }
            }
            Err(error) => {
                // An error code first (ERR, NOPROTO, ...), then the message, on one line.
                let message = error.message();
                let code_len = message.iter().take_while(|b| b.is_ascii_uppercase()).count();
                prop_assert!(code_len >= 3 && message.get(code_len) == Some(&b' '), "{}", error);
                let wire = Frame::Error(message.clone()).to_bytes(Protocol::Resp2);
                prop_assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 1);
            }
        }
    }
}
