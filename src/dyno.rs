//! Who this process is on the platform (`docs/addon-contract.md`, "The dyno"): the dyno's name,
//! which l2met reads from a metrics line's `source=`, and the client id under which a
//! private-app-tunnel registration is made.
//!
//! `$DYNO` names a dyno's place in the formation (`web.1`), not the dyno: on Cedar, during a
//! restart or deploy, the old `web.1` drains while the new `web.1` boots, often on the same
//! host (so with the same kernel boot id). A client id made of those two alone is shared by
//! both, and the old one's deregistration removes the new one's access. The client id is
//! therefore `<name>_<instance>`, where the instance is `$HEROKU_DYNO_ID` (Heroku's id of this
//! very dyno, set where dyno metadata is enabled) or else a random UUID drawn by this process:
//! the same shape as the old script's `<DYNO>_<boot id>`, unique to the registering process.

use std::fmt::Write as _;

/// A variable of the platform that could not be used as it is, and what was done instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice {
    pub var: &'static str,
    pub notice: &'static str,
}

#[derive(Debug, Clone)]
pub struct Dyno {
    /// `$DYNO`, else the host name.
    pub name: String,
    /// What this process registers as in private-app-tunnel mode.
    pub client_id: String,
    /// In a `heroku ps:exec` session (`SSH_CLIENT` is set): a person's shell beside the app's
    /// processes, where the launch forms that run from profile.d and exec.d start nothing.
    pub in_ps_exec: bool,
    notices: Vec<Notice>,
}

impl Dyno {
    /// Reads `DYNO`, `HEROKU_DYNO_ID` and `SSH_CLIENT`; draws the instance when there is no dyno
    /// id.
    #[expect(
        clippy::disallowed_methods,
        reason = "the platform's variables are this module's to read"
    )]
    pub fn from_env() -> Dyno {
        let var = |name: &str| std::env::var(name).ok().map(|v| v.trim().to_owned());
        let mut dyno = Dyno::from_vars(var("DYNO"), var("HEROKU_DYNO_ID"), host_name, random_uuid);
        dyno.in_ps_exec = std::env::var_os("SSH_CLIENT").is_some_and(|client| !client.is_empty());
        dyno
    }

    fn from_vars(
        dyno: Option<String>,
        dyno_id: Option<String>,
        host_name: impl FnOnce() -> String,
        random_uuid: impl FnOnce() -> String,
    ) -> Dyno {
        let mut notices = Vec::new();
        let name = match dyno.filter(|name| !name.is_empty()) {
            Some(name) => name,
            None => {
                notices.push(Notice {
                    var: "DYNO",
                    notice:
                        "DYNO is not set (not on a Heroku dyno?); the host name stands in for it",
                });
                host_name()
            }
        };
        let instance = match dyno_id.filter(|id| !id.is_empty()) {
            Some(id) if is_dyno_id(&id) => id,
            Some(_) => {
                notices.push(Notice {
                    var: "HEROKU_DYNO_ID",
                    notice: "HEROKU_DYNO_ID is not an id (expected up to 64 letters, digits and dashes); a random one is used instead",
                });
                random_uuid()
            }
            None => random_uuid(),
        };
        Dyno {
            client_id: format!("{name}_{instance}"),
            name,
            in_ps_exec: false,
            notices,
        }
    }

    pub fn notices(&self) -> &[Notice] {
        &self.notices
    }
}

/// Heroku's dyno ids are UUID-like; anything else could not go into a URL path or a JSON
/// string unchanged, so it is not used.
fn is_dyno_id(id: &str) -> bool {
    id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

/// A version 4 UUID from the operating system's generator, or from a seeded one if the system
/// has none to give: it only has to differ from another process's.
fn random_uuid() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        bytes = fastrand::u128(..).to_le_bytes();
    }
    uuid_v4(bytes)
}

fn uuid_v4(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut text = String::with_capacity(36);
    for (i, byte) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text.push('-');
        }
        let _ = write!(text, "{byte:02x}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dyno(name: Option<&str>, id: Option<&str>) -> Dyno {
        Dyno::from_vars(
            name.map(str::to_owned),
            id.map(str::to_owned),
            || "host-7".to_owned(),
            || "random".to_owned(),
        )
    }

    #[test]
    fn the_client_id_is_the_dyno_and_its_instance() {
        let id = "1vac4117-c29f-4312-521e-ba4d8638c1ac";
        let with_id = dyno(Some("web.1"), Some(id));
        assert_eq!(with_id.name, "web.1");
        assert_eq!(with_id.client_id, format!("web.1_{id}"));
        assert!(with_id.notices().is_empty());

        let drawn = dyno(Some("web.1"), None);
        assert_eq!(drawn.client_id, "web.1_random");
        assert!(drawn.notices().is_empty());
        assert_eq!(dyno(Some("web.1"), Some("")).client_id, "web.1_random");
    }

    #[test]
    fn what_cannot_be_used_is_replaced_and_named() {
        let outside = dyno(None, None);
        assert_eq!(outside.name, "host-7");
        assert_eq!(outside.client_id, "host-7_random");
        assert_eq!(outside.notices()[0].var, "DYNO");
        assert_eq!(dyno(Some(""), None).name, "host-7");

        for bad in ["a/b", "a b", "x\"y", &"a".repeat(65)] {
            let odd = dyno(Some("web.1"), Some(bad));
            assert_eq!(odd.client_id, "web.1_random", "{bad}");
            assert_eq!(odd.notices().len(), 1, "{bad}");
            assert_eq!(odd.notices()[0].var, "HEROKU_DYNO_ID");
        }
        assert_eq!(
            dyno(Some("web.1"), Some(&"a".repeat(64))).client_id,
            format!("web.1_{}", "a".repeat(64))
        );
    }

    #[test]
    fn drawn_instances_are_v4_uuids_and_differ() {
        let a = random_uuid();
        let b = random_uuid();
        assert_ne!(a, b);
        for uuid in [&a, &b] {
            assert_eq!(uuid.len(), 36, "{uuid}");
            let groups: Vec<&str> = uuid.split('-').collect();
            assert_eq!(
                groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12]
            );
            assert!(groups[2].starts_with('4'), "{uuid}");
            assert!("89ab".contains(&groups[3][..1]), "{uuid}");
        }
        assert_eq!(uuid_v4([0xff; 16]), "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(uuid_v4([0; 16]), "00000000-0000-4000-8000-000000000000");
    }
}
