#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| framecast_compositor::fuzzing::prepared_file(data));
