//! The keys of an add-on's SSH server: the client key we authenticate with and the host key we
//! pin, with the parsers for the forms the add-on writes them in.

use std::fmt;
use std::sync::Arc;

use russh::keys::{PrivateKey, PublicKey};

/// The client's private key, held only in memory. `ssh_key` zeroizes it on drop.
#[derive(Clone)]
pub struct ClientKey(pub Arc<PrivateKey>);

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientKey({})", self.0.algorithm())
    }
}

/// The server key the add-on told us to expect. Compared by exact blob equality.
#[derive(Clone, PartialEq, Eq)]
pub struct HostKey {
    key: PublicKey,
    blob: Vec<u8>,
}

impl HostKey {
    pub fn matches(&self, presented: &PublicKey) -> bool {
        presented
            .to_bytes()
            .is_ok_and(|presented| presented == self.blob)
    }

    pub fn algorithm(&self) -> russh::keys::Algorithm {
        self.key.algorithm()
    }

    /// `ssh-ed25519 SHA256:...`, the form OpenSSH prints, for log lines.
    pub fn describe(&self) -> String {
        describe_key(&self.key)
    }
}

impl fmt::Debug for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostKey({})", self.describe())
    }
}

pub fn describe_key(key: &PublicKey) -> String {
    format!(
        "{} {}",
        key.algorithm(),
        key.fingerprint(russh::keys::HashAlg::Sha256)
    )
}

/// Accepts OpenSSH and PEM (PKCS#1, SEC1, PKCS#8) encodings, tolerating CRLF and stray
/// indentation. The returned message never contains key material.
pub fn parse_private_key(raw: &str) -> Result<PrivateKey, String> {
    let mut normalized = zeroize::Zeroizing::new(String::with_capacity(raw.len() + 1));
    for line in raw.lines() {
        normalized.push_str(line.trim());
        normalized.push('\n');
    }
    match russh::keys::decode_secret_key(&normalized, None) {
        Ok(key) => Ok(key),
        Err(russh::keys::Error::KeyIsEncrypted) => Err(
            "is protected by a passphrase; expected an unencrypted private key".into(),
        ),
        Err(russh::keys::Error::UnsupportedKeyType { .. }) => Err(
            "is of an unsupported type; expected an ed25519, RSA or ECDSA private key".into(),
        ),
        Err(_) => Err(
            "could not be read; expected an unencrypted ed25519, RSA or ECDSA private key in OpenSSH or PEM (PKCS#1, SEC1, PKCS#8) format, with newlines written as \\n"
                .into(),
        ),
    }
}

/// Accepts `<type> <base64> [comment]`, or the bare base64 blob.
pub fn parse_host_key(raw: &str) -> Result<HostKey, String> {
    let expected =
        "expected the server's public key as \"<type> <base64>\", e.g. \"ssh-ed25519 AAAA...\"";
    let tokens: Vec<&str> = raw.split_whitespace().collect();
    let (declared_type, blob) = match tokens.as_slice() {
        [blob] => (None, *blob),
        [key_type, blob, ..] => (Some(*key_type), *blob),
        [] => return Err(format!("is empty; {expected}")),
    };
    let key = russh::keys::parse_public_key_base64(blob)
        .map_err(|_| format!("could not be decoded; {expected}"))?;
    if let Some(declared) = declared_type {
        if declared != key.algorithm().as_str() {
            // Quoted only when it is a key type's name: the value may be something else pasted.
            let declared = match declared.parse::<russh::keys::Algorithm>() {
                Ok(_) => format!("{declared:?}"),
                Err(_) => "another type".to_owned(),
            };
            return Err(format!(
                "says {declared} but the key is {}; {expected}",
                key.algorithm()
            ));
        }
    }
    let blob = key
        .to_bytes()
        .map_err(|_| format!("could not be encoded; {expected}"))?;
    Ok(HostKey { key, blob })
}
