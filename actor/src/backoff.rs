//! Pauses between retries of a call to a service that may be restarting or overloaded (the
//! channels, clients and deadlines themselves are [`prime_proto::client`]'s).
use std::time::Duration;

/// Exponential pauses between retries: 100 ms doubling up to a maximum, each drawn between
/// half and all of the current step so that actors restarted together do not retry in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
    max: Duration,
}

/// The first pause of a [`Backoff`].
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

impl Backoff {
    /// Pauses up to `max`.
    pub fn new(max: Duration) -> Self {
        Self {
            step: INITIAL_BACKOFF.min(max),
            max,
        }
    }

    /// The next pause; the step doubles after each call, up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        step.mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..=1.0))
    }

    /// Starts again from the first pause, after a success.
    pub fn reset(&mut self) {
        self.step = INITIAL_BACKOFF.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum_with_jitter_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(700));
        // Steps: 100, 200, 400, 700, 700; each pause lies in [step / 2, step].
        for step_ms in [100u64, 200, 400, 700, 700] {
            let delay = backoff.next_delay();
            let step = Duration::from_millis(step_ms);
            assert!(delay >= step / 2 && delay <= step, "{delay:?} for {step:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= INITIAL_BACKOFF);
        // A maximum below the first step caps that too.
        let mut small = Backoff::new(Duration::from_millis(10));
        assert!(small.next_delay() <= Duration::from_millis(10));
    }
}
