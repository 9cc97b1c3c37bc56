//! The accessors of a model's flat buffers, shared by GPT, BERT and T5: each keeps its backend
//! `be`, its parameter table `table`, and one flat parameter and one flat gradient buffer
//! (`params`, `grads`) laid out by that table (llm.c's layout). Written once here and expanded
//! inside each model's `impl` (the field names are the contract).

macro_rules! flat_param_accessors {
    () => {
        pub fn table(&self) -> &$crate::params::ParamTable {
            &self.table
        }
        pub fn backend(&self) -> &B {
            &self.be
        }
        pub fn params(&self) -> &B::Buf {
            &self.params
        }
        pub fn grads(&self) -> &B::Buf {
            &self.grads
        }
        /// Parameters (mutable, for the optimizer) and gradients together.
        pub fn params_and_grads(&mut self) -> (&B, &$crate::params::ParamTable, &mut B::Buf, &B::Buf) {
            (&self.be, &self.table, &mut self.params, &self.grads)
        }
        /// The backend and the gradient buffer, writable (averaging gradients across ranks).
        pub fn backend_and_grads_mut(&mut self) -> (&B, &mut B::Buf) {
            (&self.be, &mut self.grads)
        }
        pub fn params_host(&self) -> Vec<f32> {
            self.be.download(self.be.view(&self.params, 0..self.table.total()))
        }
        pub fn grads_host(&self) -> Vec<f32> {
            self.be.download(self.be.view(&self.grads, 0..self.table.total()))
        }
        pub fn set_params_host(&mut self, host: &[f32]) {
            assert_eq!(host.len(), self.table.total(), "parameter count");
            self.be.write(self.be.view_mut(&mut self.params, 0..host.len()), host);
        }
        pub fn zero_grad(&mut self) {
            let n = self.table.total();
            self.be.fill(self.be.view_mut(&mut self.grads, 0..n), 0.0);
        }
    };
}
pub(crate) use flat_param_accessors;
