//! One test body, written once as a generic fn over `Backend`, run on the CPU reference and on
//! the GPU (candle's pattern): `both!(body, args..)` makes the closure a comparison calls once
//! with each backend through the object-safe [`Runner`]. `O` is the body's output type.

use std::any::Any;

use smelt_engine::cuda::CudaBackend;
use smelt_engine::CpuBackend;

pub trait Runner<O> {
    fn run(&self, f: &dyn Fn(&dyn Any) -> O) -> O;
}

impl<O> Runner<O> for CpuBackend {
    fn run(&self, f: &dyn Fn(&dyn Any) -> O) -> O {
        f(self)
    }
}

impl<O> Runner<O> for CudaBackend {
    fn run(&self, f: &dyn Fn(&dyn Any) -> O) -> O {
        f(self)
    }
}

/// Calls the generic body `$f::<B>(be, args..)` for whichever backend `r` is.
macro_rules! both {
    ($f:ident $(, $arg:expr)*) => {
        |r: &dyn backend_pair::Runner<_>| r.run(&|any: &dyn std::any::Any| {
            if let Some(be) = any.downcast_ref::<smelt_engine::CpuBackend>() {
                $f(be $(, $arg)*)
            } else if let Some(be) = any.downcast_ref::<smelt_engine::cuda::CudaBackend>() {
                $f(be $(, $arg)*)
            } else {
                unreachable!("two backends")
            }
        })
    };
}
