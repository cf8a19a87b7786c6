//! Stop strings over a stream of text deltas.
//!
//! [`StopMatcher`] emits text as soon as it can no longer be part of a stop string. It holds back
//! the longest suffix of the text seen so far that is the start of some stop string, so a stop
//! string split across several deltas is still found, and no part of it is ever emitted.

use crate::error::StopStringError;

/// Most stop strings one matcher accepts.
pub const MAX_STOP_STRINGS: usize = 16;

/// Longest stop string accepted, in bytes of UTF-8.
pub const MAX_STOP_STRING_BYTES: usize = 256;

/// What [`StopMatcher::push`] produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text that is safe to emit now. When a stop string was hit, the text before it.
    pub text: String,
    /// Index (in the list given to [`StopMatcher::new`]) of the stop string that was hit, if any.
    /// Once set, generation should end; later pushes return no text and the same index.
    pub stop: Option<usize>,
}

impl StopOutcome {
    /// Whether a stop string was hit.
    pub fn stopped(&self) -> bool {
        self.stop.is_some()
    }
}

/// Finds stop strings in streamed text.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text not yet emitted because it may be the start of a stop string.
    held: String,
    stopped: Option<usize>,
}

impl StopMatcher {
    /// Validates the stop strings: none empty, at most [`MAX_STOP_STRINGS`] of them, each at most
    /// [`MAX_STOP_STRING_BYTES`] long. An empty list is valid and matches nothing.
    pub fn new(stops: Vec<String>) -> Result<Self, StopStringError> {
        if stops.len() > MAX_STOP_STRINGS {
            return Err(StopStringError::TooMany { count: stops.len(), max: MAX_STOP_STRINGS });
        }
        for (index, stop) in stops.iter().enumerate() {
            if stop.is_empty() {
                return Err(StopStringError::Empty { index });
            }
            if stop.len() > MAX_STOP_STRING_BYTES {
                let (len, max) = (stop.len(), MAX_STOP_STRING_BYTES);
                return Err(StopStringError::TooLong { index, len, max });
            }
        }
        Ok(StopMatcher { stops, held: String::new(), stopped: None })
    }

    /// Adds a delta of generated text; returns what can be emitted and whether a stop was hit.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if let Some(stop) = self.stopped {
            return StopOutcome { text: String::new(), stop: Some(stop) };
        }
        self.held.push_str(delta);

        // The earliest match wins; at equal positions, the first in the list.
        let hit =
            self.stops.iter().enumerate().filter_map(|(i, s)| self.held.find(s.as_str()).map(|pos| (pos, i))).min();
        if let Some((pos, index)) = hit {
            self.held.truncate(pos);
            self.stopped = Some(index);
            return StopOutcome { text: std::mem::take(&mut self.held), stop: Some(index) };
        }

        let keep = self.longest_partial_suffix();
        let rest = self.held.split_off(self.held.len() - keep);
        StopOutcome { text: std::mem::replace(&mut self.held, rest), stop: None }
    }

    /// Returns the text still held back, at the end of generation. Empty after a stop was hit.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of a stop string.
    /// Such a suffix starts with the first byte of a character, so cutting there is safe.
    fn longest_partial_suffix(&self) -> usize {
        let held = self.held.as_bytes();
        self.stops
            .iter()
            .filter_map(|stop| {
                let max = (stop.len() - 1).min(held.len());
                (1..=max).rev().find(|&k| held.ends_with(&stop.as_bytes()[..k]))
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect()).unwrap()
    }

    /// Feeds `deltas`, returns (everything emitted including the final flush, stop index).
    fn run(stops: &[&str], deltas: &[&str]) -> (String, Option<usize>) {
        let mut m = matcher(stops);
        let mut out = String::new();
        for d in deltas {
            let o = m.push(d);
            out.push_str(&o.text);
            if o.stopped() {
                return (out, o.stop);
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn passes_text_through_without_stops() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), None));
        assert_eq!(run(&["xyz"], &["hello", " world"]), ("hello world".into(), None));
    }

    #[test]
    fn stops_within_one_delta() {
        assert_eq!(run(&["END"], &["abcENDdef"]), ("abc".into(), Some(0)));
    }

    #[test]
    fn stops_across_deltas() {
        assert_eq!(run(&["<|end|>"], &["hi <", "|e", "nd", "|> more"]), ("hi ".into(), Some(0)));
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let mut m = matcher(&["stop"]);
        assert_eq!(m.push("a st").text, "a ");
        assert_eq!(m.push("x").text, "stx");
        assert_eq!(m.push("s").text, "");
        assert_eq!(m.flush(), "s");
    }

    #[test]
    fn false_start_then_real_stop() {
        // "aab" where the stop is "ab": the first 'a' must be released, the match found.
        assert_eq!(run(&["ab"], &["a", "a", "b"]), ("a".into(), Some(0)));
        assert_eq!(run(&["abab"], &["ab", "ab", "ab"]), ("".into(), Some(0)));
    }

    #[test]
    fn earliest_match_wins() {
        assert_eq!(run(&["cd", "bc"], &["abcd"]), ("a".into(), Some(1)));
    }

    #[test]
    fn multibyte_stop_strings() {
        assert_eq!(run(&["東京"], &["行く東", "京へ"]), ("行く".into(), Some(0)));
        assert_eq!(run(&["🙂!"], &["ok 🙂", " and 🙂", "!"]), ("ok 🙂 and ".into(), Some(0)));
    }

    #[test]
    fn nothing_after_a_stop() {
        let mut m = matcher(&["x"]);
        assert_eq!(m.push("axb").stop, Some(0));
        let o = m.push("more");
        assert_eq!((o.text.as_str(), o.stop), ("", Some(0)));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn validation() {
        assert_eq!(StopMatcher::new(vec!["a".into(), String::new()]).unwrap_err(), StopStringError::Empty { index: 1 });
        let many = vec!["s".to_string(); MAX_STOP_STRINGS + 1];
        assert!(matches!(StopMatcher::new(many), Err(StopStringError::TooMany { .. })));
        let long = "x".repeat(MAX_STOP_STRING_BYTES + 1);
        let err = StopMatcher::new(vec![long]).unwrap_err();
        assert!(matches!(err, StopStringError::TooLong { index: 0, .. }));
        assert!(err.to_string().contains("257 bytes"), "{err}");
        assert!(StopMatcher::new(vec!["s".to_string(); MAX_STOP_STRINGS]).is_ok());
    }

    /// Every way of splitting a text into deltas gives the same result as one delta.
    #[test]
    fn split_points_do_not_matter() {
        let text = "one <|im_end|> two é東🙂 <|im_e";
        let stops = ["<|im_end|>", "東🙂 x", "é東🙂 <"];
        let whole = run(&stops, &[text]);
        let bounds: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
        for &a in &bounds {
            for &b in bounds.iter().filter(|&&b| b >= a) {
                let parts = [&text[..a], &text[a..b], &text[b..]];
                assert_eq!(run(&stops, &parts), whole, "split at {a},{b}");
            }
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(&stops, &refs), whole);
        assert_eq!(whole, ("one ".into(), Some(0)));
    }
}
