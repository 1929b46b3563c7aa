//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the trace id a run carries from
//! the request that started it to every task it dispatches, read from a `traceparent` header or
//! made anew, and the ids of the spans that make up a run's trace. This module parses, writes
//! and makes the ids; `taskfleet_io::spans` exports the spans.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Identifies one trace: 16 bytes, never all zero, written as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 16]);

/// Identifies one span of a trace (a `traceparent`'s parent id): 8 bytes, never all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId([u8; 8]);

/// A `traceparent` header of version `00`, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace.
    pub trace_id: TraceId,
    /// The caller's span.
    pub parent_id: SpanId,
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

/// Describes why a trace id does not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a trace id is 32 lowercase hex digits, not all zero")]
pub struct InvalidTraceId;

/// Describes why a span id does not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a span id is 16 lowercase hex digits, not all zero")]
pub struct InvalidSpanId;

impl TraceId {
    /// Returns a new random trace id (all 128 bits random, as the specification recommends).
    pub fn random() -> Self {
        use ring::rand::SecureRandom as _;
        let random = ring::rand::SystemRandom::new();
        loop {
            let mut bytes = [0_u8; 16];
            if random.fill(&mut bytes).is_err() {
                // The system's generator failing is as unlikely as it is unrecoverable; a
                // version 4 UUID still gives 122 random bits from the same source.
                bytes = uuid::Uuid::new_v4().into_bytes();
            }
            if bytes != [0; 16] {
                return Self(bytes);
            }
        }
    }

    /// Returns the id's bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }
}

impl SpanId {
    /// Returns a new random span id.
    pub fn random() -> Self {
        let bytes = TraceId::random().to_bytes();
        let (high, low) = bytes.split_at(8);
        let mut id = [0_u8; 8];
        id.copy_from_slice(if high == [0; 8] { low } else { high });
        Self(id)
    }

    /// Returns the id of run `run`'s own span: the same in every process, so that the scheduler
    /// that ends the run and the workers that run its steps agree on it without telling each
    /// other (a hash of the run id, never zero).
    pub fn of_run(run: uuid::Uuid) -> Self {
        Self::derived(b"taskfleet run span ", run.as_bytes())
    }

    /// Returns the id of the span of attempt `attempt` of task `task`, or with `executor`, of
    /// that attempt's executor call: derived from them as a run's is, so it costs no system
    /// call and names the attempt whichever process exports it.
    pub fn of_attempt(task: uuid::Uuid, attempt: u32, executor: bool) -> Self {
        let label: &[u8] = if executor {
            b"taskfleet executor span "
        } else {
            b"taskfleet attempt span "
        };
        Self::derived(
            label,
            &[task.as_bytes().as_slice(), &attempt.to_be_bytes()].concat(),
        )
    }

    /// Returns an id hashed from `label` and `bytes`, never zero.
    fn derived(label: &[u8], bytes: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, &[label, bytes].concat());
        let mut id = [0_u8; 8];
        for chunk in digest.as_ref().chunks_exact(8) {
            id.copy_from_slice(chunk);
            if id != [0; 8] {
                break;
            }
        }
        Self(id)
    }

    /// Returns the id's bytes.
    pub fn to_bytes(self) -> [u8; 8] {
        self.0
    }
}

/// Reads `N` bytes from exactly `2 * N` lowercase hex digits, none of them all zero.
fn non_zero_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let bytes = lowercase_hex::<N>(text)?;
    (bytes != [0; N]).then_some(bytes)
}

/// Reads `N` bytes from exactly `2 * N` lowercase hex digits.
fn lowercase_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let digit = |byte: u8| match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        _ => None,
    };
    let mut bytes = [0_u8; N];
    for (index, pair) in digits.chunks_exact(2).enumerate() {
        bytes[index] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(bytes)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for byte in bytes {
        write!(f, "{byte:02x}")?;
    }
    Ok(())
}

impl TraceParent {
    /// Reads a `traceparent` header value strictly: version `00`, then a trace id, a parent id
    /// and flags, each lowercase hex of its exact length and separated by `-`, the ids not all
    /// zero. Returns `None` for anything else; the specification then has the receiver start
    /// a new trace.
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || version != "00" {
            return None;
        }
        Some(Self {
            trace_id: TraceId(non_zero_hex(trace_id)?),
            parent_id: SpanId(non_zero_hex(parent_id)?),
            flags: lowercase_hex::<1>(flags)?[0],
        })
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

impl std::str::FromStr for TraceId {
    type Err = InvalidTraceId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        non_zero_hex(text).map(Self).ok_or(InvalidTraceId)
    }
}

impl std::str::FromStr for SpanId {
    type Err = InvalidSpanId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        non_zero_hex(text).map(Self).ok_or(InvalidSpanId)
    }
}

impl Serialize for TraceId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TraceId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    fn check(header: &str, expected: Option<(&str, &str, u8)>) {
        let parsed = TraceParent::parse(header);
        assert_eq!(
            parsed.map(|parent| (
                parent.trace_id.to_string(),
                parent.parent_id.to_string(),
                parent.flags
            )),
            expected.map(|(trace, parent, flags)| (trace.to_owned(), parent.to_owned(), flags)),
            "{header:?}"
        );
        if let Some(parsed) = parsed {
            assert_eq!(parsed.to_string(), header, "written back as read");
        }
    }

    #[test]
    fn span_ids_are_random_or_the_run_s_own() {
        let run = uuid::Uuid::new_v4();
        assert_eq!(SpanId::of_run(run), SpanId::of_run(run));
        assert_ne!(SpanId::of_run(run), SpanId::of_run(uuid::Uuid::new_v4()));
        assert_ne!(SpanId::random(), SpanId::random());
        let task = uuid::Uuid::new_v4();
        let ids = [
            SpanId::of_attempt(task, 1, false),
            SpanId::of_attempt(task, 2, false),
            SpanId::of_attempt(task, 1, true),
            SpanId::of_run(task),
        ];
        assert_eq!(ids[0], SpanId::of_attempt(task, 1, false));
        assert_eq!(
            ids.iter().collect::<std::collections::HashSet<_>>().len(),
            4
        );
        let id = SpanId::random();
        assert_eq!(id.to_string().parse::<SpanId>(), Ok(id));
        assert!("0000000000000000".parse::<SpanId>().is_err());
    }

    #[test]
    fn valid_traceparents_are_read() {
        check(&format!("00-{TRACE}-{PARENT}-01"), Some((TRACE, PARENT, 1)));
        check(&format!("00-{TRACE}-{PARENT}-00"), Some((TRACE, PARENT, 0)));
        check(
            &format!("00-{TRACE}-{PARENT}-ff"),
            Some((TRACE, PARENT, 255)),
        );
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        let zero_trace = "0".repeat(32);
        let zero_parent = "0".repeat(16);
        for header in [
            String::new(),
            "garbage".to_owned(),
            format!("01-{TRACE}-{PARENT}-01"),
            format!("ff-{TRACE}-{PARENT}-01"),
            format!("0-{TRACE}-{PARENT}-01"),
            format!("00-{}-{PARENT}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{}-01", PARENT.to_uppercase()),
            format!("00-{TRACE}-{PARENT}-0A"),
            format!("00-{zero_trace}-{PARENT}-01"),
            format!("00-{TRACE}-{zero_parent}-01"),
            format!("00-{}-{PARENT}-01", &TRACE[1..]),
            format!("00-{TRACE}0-{PARENT}-01"),
            format!("00-{TRACE}-{}-01", &PARENT[1..]),
            format!("00-{TRACE}-{PARENT}-1"),
            format!("00-{TRACE}-{PARENT}-01-"),
            format!("00-{TRACE}-{PARENT}-01-extra"),
            format!("00-{TRACE}-{PARENT}"),
            format!("00_{TRACE}_{PARENT}_01"),
            format!(" 00-{TRACE}-{PARENT}-01"),
            format!("00-{}g-{PARENT}-01", &TRACE[1..]),
            format!("00-+{}-{PARENT}-01", &TRACE[1..]),
        ] {
            check(&header, None);
        }
    }

    #[test]
    fn random_trace_ids_are_valid_and_differ() {
        let one = TraceId::random();
        let other = TraceId::random();
        assert_ne!(one, other);
        let text = one.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<TraceId>(), Ok(one));
    }

    #[test]
    fn trace_ids_travel_as_strings() {
        let id: TraceId = TRACE.parse().expect("reads");
        let json = serde_json::to_string(&id).expect("writes");
        assert_eq!(json, format!("\"{TRACE}\""));
        assert_eq!(serde_json::from_str::<TraceId>(&json).expect("reads"), id);
        assert!(serde_json::from_str::<TraceId>(&format!("\"{}\"", "0".repeat(32))).is_err());
        assert!(serde_json::from_str::<TraceId>("\"ABC\"").is_err());
        assert_eq!("x".parse::<TraceId>(), Err(InvalidTraceId));
    }
}
