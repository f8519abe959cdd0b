#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| framecast_gateway::fuzzing::sdp_offer(data));
