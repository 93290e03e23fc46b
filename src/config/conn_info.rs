//! The `KEY:=VALUE|KEY:=VALUE` format of `*_TUNNEL_BPG_CONN_INFO`.
//!
//! The format is the add-on's, not ours, so parsing is deliberately liberal: unknown keys are
//! kept (and ignored by callers), an empty value means "use the default", the last occurrence of
//! a key wins, and a malformed item is reported without being echoed (it may hold a fragment of
//! a private key).

use std::collections::BTreeMap;

use zeroize::Zeroize;

/// Parsed items of one conn-info value. Values are zeroized on drop because some of them are
/// secrets (private key, JWT, passwords).
#[derive(Default, PartialEq, Eq)]
pub struct ConnInfo {
    items: BTreeMap<String, String>,
    /// 1-based positions of items that had no `:=`; reported so that a truncated value is noticed.
    malformed: Vec<usize>,
}

impl std::fmt::Debug for ConnInfo {
    // Only key names: values may be secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnInfo")
            .field("keys", &self.items.keys().collect::<Vec<_>>())
            .field("malformed", &self.malformed)
            .finish()
    }
}

impl Drop for ConnInfo {
    fn drop(&mut self) {
        for value in self.items.values_mut() {
            value.zeroize();
        }
    }
}

impl ConnInfo {
    pub fn parse(raw: &str) -> ConnInfo {
        let mut info = ConnInfo::default();
        for (index, item) in raw.split('|').enumerate() {
            if item.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = item.split_once(":=") else {
                info.malformed.push(index + 1);
                continue;
            };
            let key = key.trim();
            if key.is_empty() {
                info.malformed.push(index + 1);
                continue;
            }
            let value = unescape(value);
            if value.is_empty() {
                // An empty value keeps the default, and must not erase an earlier occurrence.
                continue;
            }
            if let Some(mut old) = info.items.insert(key.to_owned(), value) {
                old.zeroize();
            }
        }
        info
    }

    /// The value of `key`, or `None` when absent or empty.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.items.get(key).map(String::as_str)
    }

    pub fn malformed_items(&self) -> &[usize] {
        &self.malformed
    }

    /// Renders items back into the wire format. Used by tests and the demo to generate the
    /// config vars a real add-on would set.
    pub fn render<'a>(items: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
        items
            .into_iter()
            .map(|(key, value)| format!("{key}:={}", value.replace('\n', "\\n")))
            .collect::<Vec<_>>()
            .join("|")
    }
}

/// `\n` (backslash, n) stands for a newline; CRLF line ends are tolerated; trailing newlines are
/// dropped. One pass into a buffer of the final size: the value may be a private key, and a
/// buffer that grew, or an intermediate string, would leave a copy behind in freed memory.
fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        let c = if c == '\\' && chars.peek() == Some(&'n') {
            chars.next();
            '\n'
        } else {
            c
        };
        if c == '\n' && out.ends_with('\r') {
            out.pop();
        }
        out.push(c);
    }
    out.truncate(out.trim_end_matches(['\n', '\r']).len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What unescaping meant before it was done in one pass.
    fn unescape_by_replacing(value: &str) -> String {
        let mut out = value.replace("\\n", "\n").replace("\r\n", "\n");
        out.truncate(out.trim_end_matches(['\n', '\r']).len());
        out
    }

    proptest! {
        #[test]
        fn unescaping_in_one_pass_means_what_replacing_did(
            value in "[a-z\\\\n\r\n]{0,24}"
        ) {
            prop_assert_eq!(unescape(&value), unescape_by_replacing(&value));
        }
    }

    #[test]
    fn splits_items_and_keys() {
        let info = ConnInfo::parse("SSH_HOST:=a.example|SSH_PORT:=2222|SSH_USERNAME:=u");
        assert_eq!(info.get("SSH_HOST"), Some("a.example"));
        assert_eq!(info.get("SSH_PORT"), Some("2222"));
        assert_eq!(info.get("SSH_USERNAME"), Some("u"));
        assert_eq!(info.get("POSTGRES_PORT"), None);
    }

    #[test]
    fn value_may_contain_the_separator_sequence() {
        let info = ConnInfo::parse("CLIENT_APP_JWT:=a:=b");
        assert_eq!(info.get("CLIENT_APP_JWT"), Some("a:=b"));
    }

    #[test]
    fn escaped_newlines_become_newlines_and_trailing_ones_are_dropped() {
        let info = ConnInfo::parse("K:=line1\\nline2\\n\\n");
        assert_eq!(info.get("K"), Some("line1\nline2"));
    }

    #[test]
    fn crlf_is_tolerated() {
        assert_eq!(ConnInfo::parse("K:=a\r\nb\r\n").get("K"), Some("a\nb"));
        assert_eq!(ConnInfo::parse("K:=a\r\\nb").get("K"), Some("a\nb"));
    }

    #[test]
    fn empty_value_keeps_default_and_earlier_value() {
        let info = ConnInfo::parse("SSH_PORT:=|POSTGRES_PORT:=6000|POSTGRES_PORT:=");
        assert_eq!(info.get("SSH_PORT"), None);
        assert_eq!(info.get("POSTGRES_PORT"), Some("6000"));
    }

    #[test]
    fn last_occurrence_wins() {
        let info = ConnInfo::parse("SSH_HOST:=first|SSH_HOST:=second");
        assert_eq!(info.get("SSH_HOST"), Some("second"));
    }

    #[test]
    fn unknown_keys_are_kept_but_harmless_and_malformed_items_are_counted() {
        let info = ConnInfo::parse("FUTURE_KEY:=x||garbage|SSH_HOST:=h|");
        assert_eq!(info.get("FUTURE_KEY"), Some("x"));
        assert_eq!(info.get("SSH_HOST"), Some("h"));
        assert_eq!(info.malformed_items(), &[3]);
    }

    #[test]
    fn debug_never_shows_values() {
        let info = ConnInfo::parse("CLIENT_APP_JWT:=supersecret");
        assert!(!format!("{info:?}").contains("supersecret"));
    }

    fn key() -> impl Strategy<Value = String> {
        "[A-Z][A-Z_]{0,20}"
    }

    // No `|` (never in values), no backslash (it would make `\n` ambiguous), no trailing
    // newline (dropped by design), not empty (means "default").
    fn value() -> impl Strategy<Value = String> {
        "[^|\\\\\r]{0,40}[^|\\\\\r\n]".prop_filter("non-blank", |v| !v.trim().is_empty())
    }

    proptest! {
        #[test]
        fn never_panics(raw in any::<String>()) {
            let _ = ConnInfo::parse(&raw);
        }

        #[test]
        fn parse_of_render_round_trips(items in proptest::collection::btree_map(key(), value(), 0..8)) {
            let rendered = ConnInfo::render(items.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let parsed = ConnInfo::parse(&rendered);
            for (k, v) in &items {
                prop_assert_eq!(parsed.get(k), Some(v.as_str()));
            }
            prop_assert!(parsed.malformed_items().is_empty());
        }
    }
}
