//! Payload encryption (`docs/security.md`): with `TASKFLEET_ENCRYPTION_KEYS` set, run and job
//! inputs, step outputs, errors and logs are sealed with ChaCha20-Poly1305 wherever they leave a
//! process: PostgreSQL rows, RabbitMQ messages, Redis values. Ids, statuses and times stay clear.
//!
//! A sealed value is a JSON string `tfenc1:<key id>:<base64url of nonce, ciphertext and tag>`;
//! the key id and the format's version are authenticated with it. The first key seals, every
//! key opens, so keys rotate: add the new key first, keep the old ones while values sealed with
//! them remain. A value that is not sealed is read as it is (values written before encryption
//! was turned on).
//!
//! The keys are installed once per process ([`install`]); the serde adapters of the protocol
//! and record types ([`value`], [`error`], [`text`]) seal and open through them.

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};
use serde_json::Value;

/// The prefix of every sealed value, with the format's version.
const PREFIX: &str = "tfenc1:";
/// The length of a key, in bytes.
const KEY_LEN: usize = 32;
/// The longest key id.
const MAX_KEY_ID_LEN: usize = 32;

/// The keys of a process: the first seals, all open.
pub struct Keyring {
    keys: Vec<(String, LessSafeKey)>,
    random: SystemRandom,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        formatter
            .debug_struct("Keyring")
            .field("ids", &ids)
            .finish()
    }
}

/// Why a value cannot be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The value is sealed but this process has no keys.
    #[error(
        "the value is encrypted (key {0:?}), and this process has no TASKFLEET_ENCRYPTION_KEYS"
    )]
    NoKeys(String),
    /// The value is sealed with a key this process does not have.
    #[error("the value is encrypted with key {0:?}, which TASKFLEET_ENCRYPTION_KEYS does not hold")]
    UnknownKey(String),
    /// The value does not open with its key: altered, or sealed with another key of that id.
    #[error(
        "the value encrypted with key {0:?} does not open: it was altered, or the key is not the one it was sealed with"
    )]
    Corrupt(String),
    /// The value opened, but what it holds is not what was sealed.
    #[error("the value encrypted with key {0:?} holds no JSON")]
    NotJson(String),
}

impl Keyring {
    /// Reads keys from `id:base64-of-32-bytes` entries, comma-separated; the first seals. Says
    /// what is wrong with the first bad entry, never echoing a key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys: Vec<(String, LessSafeKey)> = Vec::new();
        for (index, entry) in text.split(',').map(str::trim).enumerate() {
            let position = index + 1;
            let Some((id, encoded)) = entry.split_once(':') else {
                return Err(format!("entry {position} is not `id:base64-key` (no `:`)"));
            };
            let id = id.trim();
            if id.is_empty()
                || id.len() > MAX_KEY_ID_LEN
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(format!(
                    "entry {position}: the key id must be 1 to {MAX_KEY_ID_LEN} characters among A-Z a-z 0-9 _ -"
                ));
            }
            if keys.iter().any(|(known, _)| known == id) {
                return Err(format!(
                    "entry {position}: the key id {id:?} is given twice"
                ));
            }
            let encoded = encoded.trim();
            let bytes = [STANDARD, URL_SAFE]
                .iter()
                .find_map(|engine| engine.decode(encoded).ok())
                .or_else(|| URL_SAFE_NO_PAD.decode(encoded).ok())
                .ok_or_else(|| format!("entry {position} (key {id:?}): the key is not base64"))?;
            if bytes.len() != KEY_LEN {
                return Err(format!(
                    "entry {position} (key {id:?}): the key is {} bytes, it must be {KEY_LEN} (for example: head -c 32 /dev/urandom | base64)",
                    bytes.len()
                ));
            }
            let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
                .map_err(|_| format!("entry {position} (key {id:?}): the key cannot be used"))?;
            keys.push((id.to_owned(), LessSafeKey::new(key)));
        }
        if keys.is_empty() {
            return Err("no key is given".to_owned());
        }
        Ok(Self {
            keys,
            random: SystemRandom::new(),
        })
    }

    /// Returns the id of the key that seals.
    pub fn sealing_key_id(&self) -> &str {
        self.keys.first().map_or("", |(id, _)| id.as_str())
    }

    /// Seals bytes into the sealed form.
    fn seal_bytes(&self, plaintext: &[u8]) -> String {
        let Some((id, key)) = self.keys.first() else {
            unreachable!("a keyring holds at least one key")
        };
        let mut nonce = [0_u8; NONCE_LEN];
        // The system's generator failing is a broken host; sealing with a reused nonce would be
        // worse than stopping.
        self.random
            .fill(&mut nonce)
            .unwrap_or_else(|_| panic!("the system's random number generator failed"));
        let aad = format!("{PREFIX}{id}");
        let mut body = plaintext.to_vec();
        // Sealing fails only for inputs over ChaCha20's limit (256 GiB).
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_bytes()),
            &mut body,
        )
        .unwrap_or_else(|_| panic!("a value too large to encrypt"));
        let mut sealed = Vec::with_capacity(NONCE_LEN + body.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&body);
        format!("{PREFIX}{id}:{}", URL_SAFE_NO_PAD.encode(sealed))
    }

    /// Opens the sealed form into bytes.
    fn open_bytes(&self, id: &str, encoded: &str) -> Result<Vec<u8>, SealError> {
        let key = self
            .keys
            .iter()
            .find(|(known, _)| known == id)
            .map(|(_, key)| key)
            .ok_or_else(|| SealError::UnknownKey(id.to_owned()))?;
        let corrupt = || SealError::Corrupt(id.to_owned());
        let mut sealed = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| corrupt())?;
        if sealed.len() < NONCE_LEN {
            return Err(corrupt());
        }
        let mut body = sealed.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&sealed).map_err(|_| corrupt())?;
        let aad = format!("{PREFIX}{id}");
        let plaintext = key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut body)
            .map_err(|_| corrupt())?;
        Ok(plaintext.to_vec())
    }

    /// Returns `value` sealed.
    pub fn seal_value(&self, value: &Value) -> Value {
        // Serialising a `Value` cannot fail: its map keys are strings.
        let json = serde_json::to_vec(value).unwrap_or_default();
        Value::String(self.seal_bytes(&json))
    }

    /// Returns `text` sealed.
    pub fn seal_text(&self, text: &str) -> String {
        self.seal_bytes(text.as_bytes())
    }
}

/// Splits a sealed string into its key id and its encoded body; `None` for anything else.
fn sealed_parts(text: &str) -> Option<(&str, &str)> {
    text.strip_prefix(PREFIX)?.split_once(':')
}

/// The process's keys, when encryption is on.
static KEYRING: OnceLock<Keyring> = OnceLock::new();

/// Turns encryption on for this process with `keyring`; call it once, at start, before any
/// value is read or written. Returns `false` if keys were installed already.
pub fn install(keyring: Keyring) -> bool {
    KEYRING.set(keyring).is_ok()
}

/// Returns the process's keys, if encryption is on.
pub fn keyring() -> Option<&'static Keyring> {
    KEYRING.get()
}

/// Returns `value` sealed when encryption is on; else as it is, but for its strings that could
/// be taken for sealed (or escaped) ones, which are escaped so that no value a client or a step
/// makes can pass for a sealed one.
pub fn seal(value: &Value) -> Cow<'_, Value> {
    match keyring() {
        Some(keyring) => Cow::Owned(keyring.seal_value(value)),
        None if needs_escape(value) => {
            let mut escaped = value.clone();
            escape(&mut escaped);
            Cow::Owned(escaped)
        }
        None => Cow::Borrowed(value),
    }
}

/// Returns text (logs) sealed when encryption is on, else as it is (escaped like a string of
/// [`seal`]).
pub fn seal_text(text: &str) -> Cow<'_, str> {
    match keyring() {
        Some(keyring) => Cow::Owned(keyring.seal_text(text)),
        None if collides(text) => Cow::Owned(format!("{ESCAPE}{text}")),
        None => Cow::Borrowed(text),
    }
}

/// The prefix of a string of a value written in clear that began like a sealed (or escaped)
/// one.
const ESCAPE: &str = "tfesc:";

/// Whether a string written in clear must be escaped.
fn collides(text: &str) -> bool {
    text.starts_with(PREFIX) || text.starts_with(ESCAPE)
}

/// Whether any string of `value` must be escaped.
fn needs_escape(value: &Value) -> bool {
    match value {
        Value::String(text) => collides(text),
        Value::Array(items) => items.iter().any(needs_escape),
        Value::Object(map) => map.values().any(needs_escape),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Escapes every string of `value` that must be.
fn escape(value: &mut Value) {
    match value {
        Value::String(text) if collides(text) => text.insert_str(0, ESCAPE),
        Value::Array(items) => items.iter_mut().for_each(escape),
        Value::Object(map) => map.values_mut().for_each(escape),
        _ => {}
    }
}

/// Returns a value as written by [`seal`] opened: sealed strings (at its top, or anywhere in a
/// value gathered from several, such as a `for_each` step's items) decrypted, escaped ones
/// restored, anything else as it is.
pub fn open(mut value: Value) -> Result<Value, SealError> {
    open_in_place(&mut value)?;
    Ok(value)
}

fn open_in_place(value: &mut Value) -> Result<(), SealError> {
    match value {
        Value::String(text) => {
            if let Some(escaped) = text.strip_prefix(ESCAPE) {
                *text = escaped.to_owned();
            } else if let Some((id, encoded)) = sealed_parts(text) {
                let keyring = keyring().ok_or_else(|| SealError::NoKeys(id.to_owned()))?;
                let bytes = keyring.open_bytes(id, encoded)?;
                *value = serde_json::from_slice(&bytes)
                    .map_err(|_| SealError::NotJson(id.to_owned()))?;
            }
        }
        Value::Array(items) => {
            for item in items {
                open_in_place(item)?;
            }
        }
        Value::Object(map) => {
            for item in map.values_mut() {
                open_in_place(item)?;
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

/// Returns text (logs) as written by [`seal_text`] opened.
pub fn open_text(text: String) -> Result<String, SealError> {
    if let Some(escaped) = text.strip_prefix(ESCAPE) {
        return Ok(escaped.to_owned());
    }
    let Some((id, encoded)) = sealed_parts(&text) else {
        return Ok(text);
    };
    let keyring = keyring().ok_or_else(|| SealError::NoKeys(id.to_owned()))?;
    let bytes = keyring.open_bytes(id, encoded)?;
    String::from_utf8(bytes).map_err(|_| SealError::NotJson(id.to_owned()))
}

/// Serde adapter for a payload `Value` field: sealed when written, opened when read.
pub mod value {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::Value;

    /// Writes the value, sealed when encryption is on.
    pub fn serialize<S: Serializer>(value: &Value, serializer: S) -> Result<S::Ok, S::Error> {
        super::seal(value).serialize(serializer)
    }

    /// Reads the value, opening it if it is sealed.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
        super::open(Value::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// Serde adapter for a payload of any type: sealed as its JSON when written, opened when read.
pub mod payload {
    use serde::de::DeserializeOwned;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::Value;

    /// Writes the payload, sealed when encryption is on.
    pub fn serialize<T: Serialize, S: Serializer>(
        payload: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let value = serde_json::to_value(payload).map_err(serde::ser::Error::custom)?;
        super::seal(&value).serialize(serializer)
    }

    /// Reads the payload, opening it if it is sealed.
    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<T, D::Error> {
        let value =
            super::open(Value::deserialize(deserializer)?).map_err(serde::de::Error::custom)?;
        serde_json::from_value(value).map_err(serde::de::Error::custom)
    }
}

/// Serde adapter for optional text (logs): sealed when written, opened when read.
pub mod text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Writes the text, sealed when encryption is on.
    pub fn serialize<S: Serializer>(
        text: &Option<String>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        text.as_deref().map(super::seal_text).serialize(serializer)
    }

    /// Reads the text, opening it if it is sealed.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<String>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(super::open_text)
            .transpose()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn key(byte: u8) -> String {
        STANDARD.encode([byte; KEY_LEN])
    }

    #[test]
    fn values_sealed_with_the_first_key_open_with_any_keyring_that_holds_it() {
        let old = Keyring::parse(&format!("k1:{}", key(1))).expect("one key");
        let rotated = Keyring::parse(&format!("k2:{}, k1:{}", key(2), key(1))).expect("two keys");
        let value = json!({"card": "4111 1111", "n": [1, 2]});
        let sealed = old.seal_value(&value);
        let Value::String(text) = &sealed else {
            panic!("sealed values are strings")
        };
        assert!(text.starts_with("tfenc1:k1:"), "{text}");
        assert!(!text.contains("4111"), "{text}");
        let (id, encoded) = sealed_parts(text).expect("sealed");
        let opened: Value =
            serde_json::from_slice(&rotated.open_bytes(id, encoded).expect("opens")).expect("json");
        assert_eq!(opened, value);
        // The new keyring seals with its first key, which the old one cannot open.
        let resealed = rotated.seal_value(&value);
        let Value::String(text) = &resealed else {
            panic!("sealed values are strings")
        };
        let (id, encoded) = sealed_parts(text).expect("sealed");
        assert_eq!(id, "k2");
        assert_eq!(
            old.open_bytes(id, encoded),
            Err(SealError::UnknownKey("k2".to_owned()))
        );
        // The same value seals differently every time (a fresh nonce).
        assert_ne!(old.seal_value(&value), old.seal_value(&value));
    }

    #[test]
    fn altered_values_and_wrong_keys_do_not_open() {
        let keyring = Keyring::parse(&format!("k1:{}", key(1))).expect("one key");
        let impostor = Keyring::parse(&format!("k1:{}", key(9))).expect("one key");
        let Value::String(text) = keyring.seal_value(&json!("secret")) else {
            panic!("sealed values are strings")
        };
        let (id, encoded) = sealed_parts(&text).expect("sealed");
        assert_eq!(
            impostor.open_bytes(id, encoded),
            Err(SealError::Corrupt("k1".to_owned()))
        );
        let mut altered = encoded.to_owned();
        let last = if altered.ends_with('A') { 'B' } else { 'A' };
        altered.pop();
        altered.push(last);
        assert_eq!(
            keyring.open_bytes(id, &altered),
            Err(SealError::Corrupt("k1".to_owned()))
        );
        assert!(keyring.open_bytes(id, "!!").is_err());
    }

    #[test]
    fn bad_key_settings_are_named_without_the_key() {
        for (text, needle) in [
            ("", "not `id:base64-key`"),
            ("k1", "not `id:base64-key`"),
            ("k 1:AAAA", "key id"),
            ("k1:not base64!", "not base64"),
            ("k1:AAAA", "3 bytes, it must be 32"),
        ] {
            let error = Keyring::parse(text).expect_err(text);
            assert!(error.contains(needle), "{text}: {error}");
        }
        let twice = format!("k1:{},k1:{}", key(1), key(2));
        assert!(Keyring::parse(&twice).expect_err("twice").contains("twice"));
        let secret = key(7);
        let error = Keyring::parse(&format!("k1:{secret},bad")).expect_err("bad second");
        assert!(!error.contains(&secret), "{error}");
    }

    #[test]
    fn values_not_sealed_are_read_as_they_are() {
        assert_eq!(open(json!({"a": 1})), Ok(json!({"a": 1})));
        assert_eq!(
            open(json!("tfenc but not quite")),
            Ok(json!("tfenc but not quite"))
        );
        assert_eq!(
            open_text("plain logs".to_owned()),
            Ok("plain logs".to_owned())
        );
    }

    #[test]
    fn values_in_clear_that_look_sealed_are_escaped_and_come_back_unchanged() {
        // No keys are installed in this test process: values are written in clear.
        for value in [
            json!("tfenc1:k1:AAAA"),
            json!("tfesc:x"),
            json!(["tfenc1:k1:AAAA", ["tfesc:tfesc:y"], {"k": "tfenc1:z:w"}]),
            json!({"plain": "value", "n": 1}),
        ] {
            let written = seal(&value).into_owned();
            assert_eq!(open(written.clone()), Ok(value.clone()), "{written}");
            // What was written holds no string that passes for a sealed one.
            assert!(!written.to_string().contains("\"tfenc1:"), "{written}");
        }
        // Values written one by one and gathered (a `for_each` step's items) come back too.
        let items = [json!("tfenc1:a:b"), json!(["tfesc:c"]), json!(3)];
        let gathered = Value::Array(items.iter().map(|item| seal(item).into_owned()).collect());
        assert_eq!(open(gathered), Ok(Value::Array(items.to_vec())));
        for text in ["tfenc1:k:v", "tfesc:", "plain"] {
            assert_eq!(open_text(seal_text(text).into_owned()), Ok(text.to_owned()));
        }
    }
}
