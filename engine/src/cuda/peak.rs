//! Dense bf16 tensor-core peaks of common NVIDIA data-center GPUs (vendor datasheets, dense,
//! FP32 accumulation), looked up by the device's name: the yardstick of MFU, the same one
//! PyTorch peers and llm.c report against. Unknown devices have none (no MFU is reported).

/// TFLOP/s by a distinctive part of the name, most specific first.
const PEAKS: &[(&str, f64)] = &[
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10", 125.0),
];

pub(crate) fn dense_bf16_tflops(device_name: &str) -> Option<f64> {
    PEAKS.iter().find(|(k, _)| device_name.contains(k)).map(|&(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_the_driver_reports_them() {
        assert_eq!(dense_bf16_tflops("NVIDIA H100 80GB HBM3"), Some(989.4));
        assert_eq!(dense_bf16_tflops("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(dense_bf16_tflops("NVIDIA H200"), Some(989.4));
        assert_eq!(dense_bf16_tflops("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(dense_bf16_tflops("NVIDIA L40S"), Some(362.1));
        assert_eq!(dense_bf16_tflops("NVIDIA GeForce RTX 3060"), None);
    }
}
