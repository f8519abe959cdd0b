//! Entry point for the `sdp_offer` fuzz target in `fuzz/` and for the regression test that
//! replays what it found (`tests/fuzz_regressions.rs`): an offer is either refused by
//! [`crate::offer::check`] with a reason in words, or the WebRTC library parses and answers
//! it (or refuses it) without panicking; a panic there is an offer the check must learn to
//! refuse.

use std::time::Instant;

pub fn sdp_offer(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match crate::offer::check(text) {
        Err(reason) => {
            assert!(!reason.is_empty());
            assert!(!reason.contains("0x7f"), "an address in {reason:?}");
        }
        Ok(_) => {
            let Ok(offer) = str0m::change::SdpOffer::from_sdp_string(text) else {
                return;
            };
            let mut rtc = str0m::RtcConfig::new().build(Instant::now());
            let _ = rtc.sdp_api().accept_offer(offer);
        }
    }
}
