#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| framecast_inference::fuzzing::model_config(data));
