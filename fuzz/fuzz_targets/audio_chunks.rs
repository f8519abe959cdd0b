#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| framecast_audio::fuzzing::audio_chunks(data));
