//! Rate limits held in Redis: reservations of starts under the generic cell rate algorithm
//! (GCRA), made by one Lua script for a list of starts at once, each counting against its own
//! list of limits.
//!
//! Each limit is a Redis hash at a key its caller names, with two fields in microseconds of
//! Redis's clock (`TIME`, so that every process agrees on the time): `tat`, the theoretical
//! arrival time of the next start (the GCRA state, moved only by reservations), and `tail`,
//! the same state counting the starts that were told to come back later, so that each of those
//! is given a time of its own, behind the others, rather than all the same one. A key expires
//! once both times have passed: an idle limit leaves nothing behind, and a lost key (a Redis
//! restart) reads as an idle limit, which may let a burst through but never stalls.
//!
//! This module knows nothing of runs or tasks: it reserves starts for keys.

use std::time::Duration;

use redis::aio::ConnectionLike;

/// The script. For each start in order: the time it may start is the latest of now and, over
/// its limits, `tat - tolerance`; within the horizon it is reserved (each limit's `tat` moves to
/// the later of itself and that time, plus the interval, and `last` to that time), else its
/// projected time is the same computed over `tail`, which moves likewise. A limit none of whose
/// slots was taken for over an interval (`tat + interval < now`) first has its `tail` brought
/// back to now: tasks told to come back and never seen again (cancelled) project nothing.
///
/// A start with a slot (`slot >= 0`, a late start's check on its worker) is judged on Redis's
/// clock: within `late_after` of its slot (or before it) it starts, changing nothing; later, if
/// no start was reserved after its slot (`last <= slot` on each limit) it starts now, its
/// reservation moved to now; else it is reserved like any other start (with the caller's
/// horizon, zero for a late start). Hashes are written once, at the end.
const SCRIPT: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local horizon = tonumber(ARGV[1])
local late_after = tonumber(ARGV[2])
local starts = tonumber(ARGV[3])
local tat, tail, last, fresh, changed = {}, {}, {}, {}, {}
for k = 1, #KEYS do
  local stored = redis.call('HMGET', KEYS[k], 'tat', 'tail', 'last')
  tat[k] = tonumber(stored[1]) or 0
  tail[k] = math.max(tonumber(stored[2]) or 0, tat[k])
  last[k] = tonumber(stored[3]) or 0
end
local out = {now}
local i = 4
for s = 1, starts do
  local slot = tonumber(ARGV[i])
  local count = tonumber(ARGV[i + 1])
  local first = i + 2
  i = first + 3 * count
  for j = first, i - 1, 3 do
    local k = tonumber(ARGV[j])
    if not fresh[k] then
      fresh[k] = true
      if tat[k] + tonumber(ARGV[j + 1]) < now then
        tail[k] = math.max(tat[k], now)
      end
    end
  end
  local decided = false
  if slot >= 0 then
    if now - slot <= late_after then
      out[#out + 1] = 1
      out[#out + 1] = now
      decided = true
    else
      local untaken = true
      for j = first, i - 1, 3 do
        if last[tonumber(ARGV[j])] > slot then untaken = false end
      end
      if untaken then
        for j = first, i - 1, 3 do
          local k = tonumber(ARGV[j])
          tat[k] = math.max(tat[k], now + tonumber(ARGV[j + 1]))
          tail[k] = math.max(tail[k], tat[k])
          last[k] = now
          changed[k] = true
        end
        out[#out + 1] = 1
        out[#out + 1] = now
        decided = true
      end
    end
  end
  if not decided then
    local at = now
    for j = first, i - 1, 3 do
      local k = tonumber(ARGV[j])
      at = math.max(at, tat[k] - tonumber(ARGV[j + 2]))
    end
    if at - now <= horizon then
      for j = first, i - 1, 3 do
        local k = tonumber(ARGV[j])
        tat[k] = math.max(tat[k], at) + tonumber(ARGV[j + 1])
        tail[k] = math.max(tail[k], tat[k])
        last[k] = math.max(last[k], at)
        changed[k] = true
      end
      out[#out + 1] = 1
    else
      at = now
      for j = first, i - 1, 3 do
        local k = tonumber(ARGV[j])
        at = math.max(at, tail[k] - tonumber(ARGV[j + 2]))
      end
      for j = first, i - 1, 3 do
        local k = tonumber(ARGV[j])
        tail[k] = math.max(tail[k], at) + tonumber(ARGV[j + 1])
        changed[k] = true
      end
      out[#out + 1] = 0
    end
    out[#out + 1] = at
  end
end
for k, _ in pairs(changed) do
  local ttl = math.floor((math.max(tat[k], tail[k]) - now) / 1000) + 1000
  redis.call('HSET', KEYS[k], 'tat', string.format('%.0f', tat[k]),
             'tail', string.format('%.0f', tail[k]), 'last', string.format('%.0f', last[k]))
  redis.call('PEXPIRE', KEYS[k], ttl)
end
return out
";

/// How far ahead the scheduler reserves starts, holding them until their slot. A late start on
/// a worker is reserved with no horizon at all: it starts now or not at all.
pub const HORIZON: Duration = Duration::from_millis(500);

/// One limit a start counts against: the key of its state, and its rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit<'a> {
    /// The Redis key holding the limit's state.
    pub key: &'a str,
    /// Starts per second, above 0.
    pub per_second: f64,
    /// How many may start at once after a quiet time, at least 1.
    pub burst: u32,
}

impl Limit<'_> {
    /// The time between two starts, in whole microseconds (at least 1).
    fn interval_us(&self) -> u64 {
        let interval = (1_000_000.0 / self.per_second).round();
        if interval.is_finite() && interval >= 1.0 {
            // A rate is at least one start a day: far below u64's range.
            interval as u64
        } else {
            1
        }
    }

    /// How far ahead of the schedule a start may come: `burst - 1` intervals.
    fn tolerance_us(&self) -> u64 {
        self.interval_us()
            .saturating_mul(u64::from(self.burst.max(1) - 1))
    }
}

/// What the script answered for one start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// The start is reserved at this time (microseconds since the Unix epoch, Redis's clock):
    /// now or within the horizon.
    Reserved {
        /// When it may start.
        at_us: i64,
    },
    /// Nothing was reserved: the start's turn comes past the horizon, at about this time.
    NotReserved {
        /// When its turn is projected to come, behind every start told to come back before it.
        projected_us: i64,
    },
}

/// The reservations of a list of starts, in their order, with Redis's time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservations {
    /// Redis's time when the script ran, in microseconds since the Unix epoch.
    pub now_us: i64,
    /// One per start.
    pub each: Vec<Reservation>,
}

/// Why reserving failed.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// Redis failed or could not be reached.
    #[error("reserving rate-limited starts in redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("reserving rate-limited starts in redis: no answer within {0:?}")]
    TimedOut(Duration),
    /// The script's answer does not have the expected shape.
    #[error("the rate limit script answered {0} values for {1} starts")]
    Answer(usize, usize),
}

/// The script, loaded once per process (the `redis` crate sends it by hash, and whole when
/// Redis does not know it yet).
fn script() -> &'static redis::Script {
    static SCRIPT_ONCE: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT_ONCE.get_or_init(|| redis::Script::new(SCRIPT))
}

/// One start to reserve: its slot when it is a late start's check (see [`check_late_start`]),
/// and the limits it counts against.
type Start<'s, 'a> = (Option<i64>, &'s [Limit<'a>]);

/// The keys and arguments of one call: the distinct keys, and the horizon, the late start's
/// allowance, the count of starts and for each start its slot (-1 for none), its count of
/// limits and each limit's key index (from 1), interval and tolerance.
fn arguments<'a>(
    starts: &[Start<'_, 'a>],
    horizon: Duration,
    late_after: Duration,
) -> (Vec<&'a str>, Vec<i64>) {
    let mut keys: Vec<&'a str> = Vec::new();
    let mut args =
        Vec::with_capacity(3 + starts.iter().map(|(_, s)| 2 + 3 * s.len()).sum::<usize>());
    let micros = |span: Duration| i64::try_from(span.as_micros()).unwrap_or(i64::MAX);
    let whole = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    args.push(micros(horizon));
    args.push(micros(late_after));
    args.push(starts.len() as i64);
    for (slot, limits) in starts {
        args.push(slot.map_or(-1, |slot| slot.max(0)));
        args.push(limits.len() as i64);
        for limit in *limits {
            let index = match keys.iter().position(|key| *key == limit.key) {
                Some(index) => index,
                None => {
                    keys.push(limit.key);
                    keys.len() - 1
                }
            };
            args.extend([
                index as i64 + 1,
                whole(limit.interval_us()),
                whole(limit.tolerance_us()),
            ]);
        }
    }
    (keys, args)
}

/// Reads the script's answer for `starts` starts.
fn read_answer(answer: &[i64], starts: usize) -> Result<Reservations, RateLimitError> {
    let Some((&now_us, pairs)) = answer.split_first() else {
        return Err(RateLimitError::Answer(0, starts));
    };
    if pairs.len() != 2 * starts {
        return Err(RateLimitError::Answer(answer.len(), starts));
    }
    let each = pairs
        .chunks_exact(2)
        .map(|pair| match pair {
            [1, at_us] => Reservation::Reserved { at_us: *at_us },
            [_, projected_us] => Reservation::NotReserved {
                projected_us: *projected_us,
            },
            // `chunks_exact(2)` gives pairs only.
            _ => Reservation::NotReserved {
                projected_us: now_us,
            },
        })
        .collect();
    Ok(Reservations { now_us, each })
}

/// Reserves a start for each of `starts` (each a list of the limits it counts against), in
/// order, in one round trip: a start whose turn comes within `horizon` of now is reserved at
/// that time; any other is not, and is given the time its turn is projected to come. Fails
/// after `timeout` without an answer.
pub async fn reserve<C: ConnectionLike + Send>(
    redis: &mut C,
    starts: &[Vec<Limit<'_>>],
    horizon: Duration,
    timeout: Duration,
) -> Result<Reservations, RateLimitError> {
    let starts: Vec<Start<'_, '_>> = starts.iter().map(|limits| (None, &limits[..])).collect();
    call(redis, &starts, horizon, Duration::ZERO, timeout).await
}

/// Checks the start of a task reserved at `slot_us` (microseconds, Redis's clock; `None` if it
/// was never reserved) that is about to start, all judged on Redis's clock so that a worker's
/// own clock does not matter: within `late_after` of its slot (or before it) it is reserved
/// now, changing nothing; later, it is reserved now, its reservation moved to now, if no start
/// was reserved after its slot; else it is reserved now only if its limits allow a start now,
/// and otherwise not, with the time its turn is projected to come.
pub async fn check_late_start<C: ConnectionLike + Send>(
    redis: &mut C,
    limits: &[Limit<'_>],
    slot_us: Option<i64>,
    late_after: Duration,
    timeout: Duration,
) -> Result<Reservations, RateLimitError> {
    call(
        redis,
        &[(slot_us, limits)],
        Duration::ZERO,
        late_after,
        timeout,
    )
    .await
}

/// Runs the script for `starts`.
async fn call<C: ConnectionLike + Send>(
    redis: &mut C,
    starts: &[Start<'_, '_>],
    horizon: Duration,
    late_after: Duration,
    timeout: Duration,
) -> Result<Reservations, RateLimitError> {
    if starts.is_empty() {
        return Ok(Reservations {
            now_us: 0,
            each: Vec::new(),
        });
    }
    let (keys, args) = arguments(starts, horizon, late_after);
    let mut invocation = script().prepare_invoke();
    for key in keys {
        invocation.key(key);
    }
    for arg in args {
        invocation.arg(arg);
    }
    let answer: Vec<i64> = tokio::time::timeout(timeout, invocation.invoke_async(redis))
        .await
        .map_err(|_| RateLimitError::TimedOut(timeout))??;
    read_answer(&answer, starts.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(key: &str, per_second: f64, burst: u32) -> Limit<'_> {
        Limit {
            key,
            per_second,
            burst,
        }
    }

    #[test]
    fn intervals_and_tolerances_are_whole_microseconds() {
        assert_eq!(limit("k", 4.0, 1).interval_us(), 250_000);
        assert_eq!(limit("k", 4.0, 1).tolerance_us(), 0);
        assert_eq!(limit("k", 4.0, 3).tolerance_us(), 500_000);
        assert_eq!(limit("k", 3.0, 1).interval_us(), 333_333);
        assert_eq!(limit("k", 1.0 / 86_400.0, 1).interval_us(), 86_400_000_000);
        assert_eq!(limit("k", 100_000.0, 1).interval_us(), 10);
        assert_eq!(limit("k", 1e9, 1).interval_us(), 1, "never zero");
        assert_eq!(
            limit("k", 1.0, 0).tolerance_us(),
            0,
            "a burst of 0 reads as 1"
        );
    }

    #[test]
    fn keys_are_sent_once_and_named_by_index() {
        let (a, ba) = (
            vec![limit("a", 1.0, 1)],
            vec![limit("b", 2.0, 2), limit("a", 1.0, 1)],
        );
        let starts: Vec<Start<'_, '_>> = vec![(None, &a), (Some(7), &ba), (Some(-3), &[])];
        let (keys, args) = arguments(
            &starts,
            Duration::from_millis(500),
            Duration::from_millis(100),
        );
        assert_eq!(keys, vec!["a", "b"]);
        assert_eq!(
            args,
            vec![
                500_000, 100_000, 3, // horizon, late allowance, starts
                -1, 1, 1, 1_000_000, 0, // no slot: a
                7, 2, 2, 500_000, 500_000, 1, 1_000_000, 0, // slot 7: b, a
                0, 0, // a slot before the epoch reads as 0; no limits
            ]
        );
    }

    #[test]
    fn answers_read_as_reservations() {
        let read = read_answer(&[10, 1, 10, 1, 20, 0, 90], 3).expect("reads");
        assert_eq!(read.now_us, 10);
        assert_eq!(
            read.each,
            vec![
                Reservation::Reserved { at_us: 10 },
                Reservation::Reserved { at_us: 20 },
                Reservation::NotReserved { projected_us: 90 },
            ]
        );
        assert!(read_answer(&[10, 1, 10], 2).is_err());
        assert!(read_answer(&[], 0).is_err());
    }
}
