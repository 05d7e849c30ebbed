//! Reconnect policy, sans-IO: capped exponential [`Backoff`], which relay
//! errors end a connection or the node's use of a relay
//! ([`relay_error_action`]), and the walk over a cluster's relays
//! ([`Reconnect`]).

use crate::net::peer::codes;
use crate::node::Millis;

/// Capped exponential delay: `min`, `2·min`, ... up to `max`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    min: Millis,
    max: Millis,
    current: Millis,
}

impl Backoff {
    pub fn new(min: Millis, max: Millis) -> Self {
        let min = min.max(1);
        Self {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The delay to wait now; the next one doubles (up to `max`).
    pub fn next_delay(&mut self) -> Millis {
        let d = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        d
    }

    /// The delay [`Backoff::next_delay`] would return.
    pub fn peek(&self) -> Millis {
        self.current
    }

    /// Start over (after a success).
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// What a node does about a relay's error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Keep the connection (an error about one request).
    Continue,
    /// Close it and connect again after the backoff (overloaded, rate limited).
    Reconnect,
    /// This relay refused this node (login refused, banned, replaced by
    /// another connection of the same key): stop using it.
    Refused,
}

/// See [`ErrorAction`].
pub fn relay_error_action(code: &str) -> ErrorAction {
    match code {
        c if c == codes::LOGIN_FAILED || c == codes::BANNED || c == codes::REPLACED => {
            ErrorAction::Refused
        }
        c if c == codes::RATE_LIMITED || c == codes::UNAVAILABLE => ErrorAction::Reconnect,
        _ => ErrorAction::Continue,
    }
}

/// Native node: first reconnect delay and cap.
pub const NATIVE_BACKOFF_MS: (Millis, Millis) = (200, 10_000);
/// Browser node: first reconnect delay and cap.
pub const BROWSER_BACKOFF_MS: (Millis, Millis) = (1_000, 30_000);

/// Reconnecting over the relays of one cluster: after a lost connection
/// the next relay (they serve the same chain), after the backoff; a login
/// starts the backoff over.
#[derive(Debug, Clone)]
pub struct Reconnect {
    relays: usize,
    current: usize,
    backoff: Backoff,
}

impl Reconnect {
    /// Over `relays` relays (at least one).
    pub fn new(relays: usize, (min, max): (Millis, Millis)) -> Self {
        Self {
            relays: relays.max(1),
            current: 0,
            backoff: Backoff::new(min, max),
        }
    }

    /// The relay in use (index into the driver's list).
    pub fn current(&self) -> usize {
        self.current
    }

    /// A login succeeded.
    pub fn on_login(&mut self) {
        self.backoff.reset();
    }

    /// The connection was lost: (the relay to use next, delay before connecting).
    pub fn on_lost(&mut self) -> (usize, Millis) {
        self.current = (self.current + 1) % self.relays;
        (self.current, self.backoff.next_delay())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(200, 1_000);
        let d: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(d, vec![200, 400, 800, 1_000, 1_000]);
        b.reset();
        assert_eq!(b.next_delay(), 200);
        assert_eq!(Backoff::new(0, 0).next_delay(), 1);
    }

    #[test]
    fn reconnect_walks_the_relays_and_resets_on_login() {
        let mut r = Reconnect::new(3, (100, 1_000));
        assert_eq!(r.current(), 0);
        assert_eq!(r.on_lost(), (1, 100));
        assert_eq!(r.on_lost(), (2, 200));
        assert_eq!(r.on_lost(), (0, 400));
        r.on_login();
        assert_eq!(r.on_lost(), (1, 100));
        let mut one = Reconnect::new(0, NATIVE_BACKOFF_MS);
        assert_eq!(one.on_lost(), (0, 200));
    }

    #[test]
    fn relay_errors_are_classified() {
        assert_eq!(relay_error_action(codes::BANNED), ErrorAction::Refused);
        assert_eq!(
            relay_error_action(codes::LOGIN_FAILED),
            ErrorAction::Refused
        );
        assert_eq!(relay_error_action(codes::REPLACED), ErrorAction::Refused);
        assert_eq!(
            relay_error_action(codes::RATE_LIMITED),
            ErrorAction::Reconnect
        );
        assert_eq!(
            relay_error_action(codes::UNAVAILABLE),
            ErrorAction::Reconnect
        );
        assert_eq!(relay_error_action("no_such_block"), ErrorAction::Continue);
    }
}
