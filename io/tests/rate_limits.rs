//! `rate_limits::reserve` against the real Redis on loopback, each test under keys of its own.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use redis::aio::ConnectionManager;
use taskfleet_io::rate_limits::{Limit, Reservation, Reservations, check_late_start, reserve};

const REDIS: &str = "redis://127.0.0.1:6379/0";
const TIMEOUT: Duration = Duration::from_secs(5);

async fn connect() -> ConnectionManager {
    redis::Client::open(REDIS)
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap()
}

/// A key no other test uses.
fn key(name: &str) -> String {
    format!("rate-limits-test:{}:{name}", uuid_like())
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}

fn limit(key: &str, per_second: f64, burst: u32) -> Limit<'_> {
    Limit {
        key,
        per_second,
        burst,
    }
}

/// The offset from now, in milliseconds, of each reservation (reserved: positive, not: negative
/// of its projected offset).
fn offsets(reservations: &Reservations) -> Vec<(bool, i64)> {
    reservations
        .each
        .iter()
        .map(|reservation| match reservation {
            Reservation::Reserved { at_us } => (true, (at_us - reservations.now_us) / 1000),
            Reservation::NotReserved { projected_us } => {
                (false, (projected_us - reservations.now_us) / 1000)
            }
        })
        .collect()
}

#[tokio::test]
async fn starts_are_spaced_by_the_interval_within_the_horizon_and_projected_beyond() {
    let mut redis = connect().await;
    let a = key("a");
    let starts: Vec<Vec<Limit<'_>>> = (0..6).map(|_| vec![limit(&a, 4.0, 1)]).collect();
    let reserved = reserve(&mut redis, &starts, Duration::from_millis(600), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        offsets(&reserved),
        vec![
            (true, 0),
            (true, 250),
            (true, 500),
            (false, 750),
            (false, 1000),
            (false, 1250)
        ]
    );
    // Those told to come back are counted: the next start is projected behind them.
    let again = reserve(&mut redis, &starts[..1], Duration::ZERO, TIMEOUT)
        .await
        .unwrap();
    let [(false, offset)] = offsets(&again)[..] else {
        panic!("{again:?}")
    };
    let elapsed = (again.now_us - reserved.now_us) / 1000;
    assert!(
        (1490..=1510).contains(&(offset + elapsed)),
        "projected {offset} ms after {elapsed} ms"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&a)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!((1000..=3000).contains(&ttl), "{ttl}");
}

#[tokio::test]
async fn a_burst_starts_at_once_and_every_limit_of_a_start_counts() {
    let mut redis = connect().await;
    let (a, b) = (key("a"), key("b"));
    let starts = vec![
        vec![limit(&a, 1.0, 3)],
        vec![limit(&a, 1.0, 3)],
        vec![limit(&a, 1.0, 3)],
        vec![limit(&a, 1.0, 3)],
    ];
    let reserved = reserve(&mut redis, &starts, Duration::ZERO, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        offsets(&reserved),
        vec![(true, 0), (true, 0), (true, 0), (false, 1000)]
    );
    // `b` alone is free; with `a` (full) a start waits for `a`.
    let starts = vec![
        vec![limit(&b, 10.0, 1)],
        vec![limit(&b, 10.0, 1), limit(&a, 1.0, 3)],
        vec![limit(&b, 10.0, 1)],
    ];
    let reserved = reserve(&mut redis, &starts, Duration::from_millis(150), TIMEOUT)
        .await
        .unwrap();
    let offsets = offsets(&reserved);
    assert_eq!(offsets[0], (true, 0));
    assert!(!offsets[1].0 && offsets[1].1 >= 900, "{offsets:?}");
    assert_eq!(
        offsets[2],
        (true, 100),
        "a start not reserved takes no slot"
    );
}

#[tokio::test]
async fn an_idle_limit_expires_and_a_lost_one_starts_afresh() {
    let mut redis = connect().await;
    let a = key("a");
    let one = vec![vec![limit(&a, 20.0, 1)]];
    reserve(&mut redis, &one, Duration::ZERO, TIMEOUT)
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&a)
        .query_async(&mut redis)
        .await
        .unwrap();
    // 50 ms of state and a second more, less what passed since (a loaded machine is slow).
    assert!((500..=1050).contains(&ttl), "{ttl}");
    let _: () = redis::cmd("DEL")
        .arg(&a)
        .query_async(&mut redis)
        .await
        .unwrap();
    let reserved = reserve(&mut redis, &one, Duration::ZERO, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(offsets(&reserved), vec![(true, 0)]);
}

#[tokio::test]
async fn nothing_to_reserve_sends_nothing() {
    let mut redis = connect().await;
    let reserved = reserve(&mut redis, &[], Duration::ZERO, TIMEOUT)
        .await
        .unwrap();
    assert!(reserved.each.is_empty());
}

async fn tat(redis: &mut ConnectionManager, key: &str) -> i64 {
    redis::cmd("HGET")
        .arg(key)
        .arg("tat")
        .query_async(redis)
        .await
        .unwrap()
}

const LATE_AFTER: Duration = Duration::from_millis(100);

#[tokio::test]
async fn a_late_start_is_judged_on_redis_clock_and_never_reserved_ahead() {
    let mut redis = connect().await;
    let a = key("a");
    let one = vec![limit(&a, 1.0, 1)];
    let reserved = reserve(
        &mut redis,
        &[one.clone(), one.clone()],
        Duration::from_millis(1500),
        TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(offsets(&reserved), vec![(true, 0), (true, 1000)]);
    let slot = reserved.now_us;
    let before = tat(&mut redis, &a).await;

    // A slot ahead of Redis's clock (a worker's clock ahead of it) is on time: it starts and
    // changes nothing.
    let ahead = check_late_start(
        &mut redis,
        &one,
        Some(slot + 10_000_000),
        LATE_AFTER,
        TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(offsets(&ahead), vec![(true, 0)]);
    assert_eq!(tat(&mut redis, &a).await, before, "nothing reserved again");

    // Far past its slot, with a later start reserved, it is not reserved ahead (the next start
    // is a second away, within the scheduler's horizon): it waits its turn.
    let late = check_late_start(
        &mut redis,
        &one,
        Some(slot - 10_000_000),
        LATE_AFTER,
        TIMEOUT,
    )
    .await
    .unwrap();
    let [(false, offset)] = offsets(&late)[..] else {
        panic!("a late start was let through: {late:?}")
    };
    let elapsed = (late.now_us - slot) / 1000;
    assert!(
        (1995..=2005).contains(&(offset + elapsed)),
        "projected {offset} ms after {elapsed} ms"
    );

    // Nor when a start is free a quarter of a second from now, well within the horizon the
    // scheduler reserves with: a late start starts now or not at all.
    let b = key("b");
    let quick = vec![limit(&b, 4.0, 1)];
    let reserved = reserve(
        &mut redis,
        &[quick.clone(), quick.clone()],
        Duration::from_millis(500),
        TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(offsets(&reserved), vec![(true, 0), (true, 250)]);
    let late = check_late_start(
        &mut redis,
        &quick,
        Some(reserved.now_us - 1_000_000),
        LATE_AFTER,
        TIMEOUT,
    )
    .await
    .unwrap();
    assert!(!offsets(&late)[0].0, "reserved ahead: {late:?}");

    // Late, but no start was reserved after its slot: it starts now, and the next start is
    // spaced from now rather than from its slot.
    let c = key("c");
    let one = vec![limit(&c, 1.0, 1)];
    let reserved = reserve(
        &mut redis,
        std::slice::from_ref(&one),
        Duration::ZERO,
        TIMEOUT,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = check_late_start(&mut redis, &one, Some(reserved.now_us), LATE_AFTER, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(offsets(&late), vec![(true, 0)]);
    assert!(late.now_us - reserved.now_us >= 300_000);
    assert_eq!(tat(&mut redis, &c).await, late.now_us + 1_000_000);
    // Without a slot at all, it starts only if a start is free now.
    let unreserved = check_late_start(&mut redis, &one, None, LATE_AFTER, TIMEOUT)
        .await
        .unwrap();
    assert!(!offsets(&unreserved)[0].0, "{unreserved:?}");
}

#[tokio::test]
async fn starts_told_to_come_back_and_never_seen_again_do_not_hold_an_idle_limit() {
    let mut redis = connect().await;
    let a = key("a");
    let starts: Vec<Vec<Limit<'_>>> = (0..40).map(|_| vec![limit(&a, 20.0, 1)]).collect();
    let reserved = reserve(&mut redis, &starts, Duration::ZERO, TIMEOUT)
        .await
        .unwrap();
    let told = offsets(&reserved);
    assert_eq!(told[0], (true, 0));
    assert_eq!(told[39], (false, 1950));
    // The 39 told to come back are cancelled; the limit stays idle for a few intervals.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let two = &starts[..2];
    let reserved = reserve(&mut redis, two, Duration::ZERO, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        offsets(&reserved),
        vec![(true, 0), (false, 50)],
        "projected behind the new start only"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&a)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!((500..=1100).contains(&ttl), "{ttl}");
}
