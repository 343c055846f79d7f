//! Redis's glob patterns (`stringmatchlen`): `*`, `?`, `[abc]`, `[^a]`, `[a-z]` and `\`
//! escapes, on bytes. Used by `SCAN ... MATCH` and `KEYS`, which filter keys on the node.

/// Whether `text` matches `pattern`. Iterative with one backtrack point for the last `*`, so
/// a hostile pattern costs at most `pattern × text` steps, never exponential time.
pub fn matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if let Some((advance, ok)) = step(pattern, p, text[t]) {
            if ok {
                p += advance;
                t += 1;
                continue;
            }
        } else if pattern.get(p) == Some(&b'*') {
            // Collapse a run of stars; remember where to come back to.
            while pattern.get(p) == Some(&b'*') {
                p += 1;
            }
            star = Some((p, t));
            continue;
        }
        match star {
            Some((sp, st)) => {
                p = sp;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&b| b == b'*')
}

/// Matches one text byte against the pattern element at `p`: `Some((length of the element,
/// whether it matched))`, or `None` at a `*` or the pattern's end (not a single-byte element).
fn step(pattern: &[u8], p: usize, c: u8) -> Option<(usize, bool)> {
    match *pattern.get(p)? {
        b'*' => None,
        b'?' => Some((1, true)),
        b'\\' if p + 1 < pattern.len() => Some((2, pattern[p + 1] == c)),
        b'[' => {
            let mut i = p + 1;
            let negate = pattern.get(i) == Some(&b'^');
            if negate {
                i += 1;
            }
            let mut hit = false;
            loop {
                match pattern.get(i) {
                    // An unclosed class ends at the pattern's end, as in Redis.
                    None => break,
                    Some(b']') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < pattern.len() => {
                        hit |= pattern[i + 1] == c;
                        i += 2;
                    }
                    Some(&lo) if pattern.get(i + 1) == Some(&b'-') && i + 2 < pattern.len() => {
                        let hi = pattern[i + 2];
                        let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
                        hit |= (lo..=hi).contains(&c);
                        i += 3;
                    }
                    Some(&b) => {
                        hit |= b == c;
                        i += 1;
                    }
                }
            }
            Some((i - p, hit != negate))
        }
        b => Some((1, b == c)),
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn redis_glob_rules() {
        let yes = [
            ("*", ""),
            ("*", "abc"),
            ("a*", "abc"),
            ("*c", "abc"),
            ("a?c", "abc"),
            ("h[ae]llo", "hello"),
            ("h[^e]llo", "hallo"),
            ("h[a-b]llo", "hbllo"),
            ("user:*:name", "user:42:name"),
            ("\\*", "*"),
            ("**a", "xa"),
        ];
        let no = [("a*", "bac"), ("a?c", "ac"), ("h[ae]llo", "hillo"), ("h[^e]llo", "hello"), ("\\*", "a"), ("", "a")];
        for (p, t) in yes {
            assert!(matches(p.as_bytes(), t.as_bytes()), "{p} should match {t}");
        }
        for (p, t) in no {
            assert!(!matches(p.as_bytes(), t.as_bytes()), "{p} should not match {t}");
        }
    }
}
