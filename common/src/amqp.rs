//! AMQP connection settings shared by the scheduler and the workers.

/// The heartbeat interval asked of RabbitMQ when the URL names none, in seconds. A peer that
/// stays silent for about three times this long (a frozen process, a vanished host) loses its
/// connection, and the broker hands its unacknowledged tasks to other workers.
pub const DEFAULT_HEARTBEAT_S: u16 = 5;

/// Returns `url` with a `heartbeat` query parameter of `seconds`, unless it already has one
/// (which then wins).
pub fn with_heartbeat(url: &str, seconds: u16) -> String {
    let (base, fragment) = match url.split_once('#') {
        Some((base, fragment)) => (base, Some(fragment)),
        None => (url, None),
    };
    let query = base.split_once('?').map(|(_, query)| query);
    let has_heartbeat = query.is_some_and(|query| {
        query
            .split('&')
            .any(|pair| pair.split('=').next() == Some("heartbeat"))
    });
    if has_heartbeat {
        return url.to_owned();
    }
    let separator = match query {
        None => "?",
        Some("") => "",
        Some(_) => "&",
    };
    let mut out = format!("{base}{separator}heartbeat={seconds}");
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_is_added_unless_named() {
        let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
        assert_eq!(with_heartbeat(url, 10), format!("{url}?heartbeat=10"));
        assert_eq!(
            with_heartbeat(&format!("{url}?frame_max=8192"), 5),
            format!("{url}?frame_max=8192&heartbeat=5")
        );
        assert_eq!(
            with_heartbeat(&format!("{url}?"), 5),
            format!("{url}?heartbeat=5")
        );
        let named = format!("{url}?heartbeat=30&channel_max=10");
        assert_eq!(with_heartbeat(&named, 5), named);
    }
}
