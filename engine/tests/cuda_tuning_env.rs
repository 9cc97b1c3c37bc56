//! A performance switch set to something it cannot mean stops `CudaBackend::new` with an error
//! naming the variable, before any device is touched (so this runs on machines without a GPU).
//! Its own test binary: it sets a variable of this process.
#![cfg(feature = "cuda")]

use smelt_engine::cuda::CudaBackend;
use smelt_engine::error::EngineError;

#[test]
fn an_invalid_switch_is_refused_naming_the_variable() {
    // SAFETY: the only test in this binary, so no other thread reads the environment.
    unsafe { std::env::set_var("SMELT_ATTN_FUSED_BWD", "yes") };
    let e = CudaBackend::new(0).expect_err("SMELT_ATTN_FUSED_BWD=yes must be refused");
    match &e {
        EngineError::Config(c) => {
            assert_eq!(c.field, "SMELT_ATTN_FUSED_BWD");
            assert!(c.message.contains("`yes`"), "{c:?}");
        }
        other => panic!("expected a ConfigError naming SMELT_ATTN_FUSED_BWD, got {other:?}"),
    }
    assert!(e.to_string().contains("SMELT_ATTN_FUSED_BWD"), "{e}");
}
