//! Waiting on a condition with a deadline: the only way the harness and the tests wait.
//!
//! A probe returns `Ok(value)` when the condition holds and `Err(why not)` otherwise; the
//! last `why not` goes into the failure message, so a timeout says what was still wrong
//! (openraft's `Wait`). The pause between probes starts at 20 ms and grows to 250 ms.

use std::future::Future;
use std::time::{Duration, Instant};

/// Probes until it succeeds or `timeout` passes; on timeout, the last reason.
pub async fn try_until<T, F, Fut>(timeout: Duration, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        let why = match probe().await {
            Ok(v) => return Ok(v),
            Err(why) => why,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(why);
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Probes until it succeeds; panics after `timeout` with `what` and the last reason.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    match try_until(timeout, probe).await {
        Ok(v) => v,
        Err(why) => panic!("timed out after {timeout:?} waiting for {what}: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let mut n = 0;
        let v = until("three probes", Duration::from_secs(5), || {
            n += 1;
            let n = n;
            async move { if n >= 3 { Ok(n) } else { Err(format!("n={n}")) } }
        })
        .await;
        assert_eq!(v, 3);
    }

    #[tokio::test]
    async fn times_out_with_the_last_reason() {
        let r: Result<(), String> = try_until(Duration::from_millis(100), || async {
            Err("never".to_owned())
        })
        .await;
        assert_eq!(r, Err("never".to_owned()));
    }
}
