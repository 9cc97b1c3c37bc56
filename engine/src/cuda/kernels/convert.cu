// f32 -> bf16 operand conversion for the tensor-core matmuls.
//
// cuBLAS's CUBLAS_COMPUTE_32F_FAST_16BF on f32 operands measured ~60-190 TFLOP/s on an H100
// (bench/NOTES.md): it converts inside the GEMM. Converting each operand once into a bf16
// scratch buffer (one pass over memory) and running a bf16 x bf16 -> f32 GEMM is several times
// faster for the same rounding (round to nearest even, as __float2bfloat16_rn).

typedef unsigned long long u64;

// f32_to_bf16_rne comes from bf16.cuh, prepended by kernels.rs.

// out[i] = bf16(in[i]); four elements per thread where both pointers allow 16/8-byte access.
extern "C" __global__ void f32_to_bf16(unsigned short* out, const float* in, u64 n) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    const u64 tid = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    const bool vec = ((((u64)in) & 15u) == 0) && ((((u64)out) & 7u) == 0);
    if (vec) {
        const u64 n4 = n / 4;
        const float4* in4 = (const float4*)in;
        uint2* out4 = (uint2*)out;
        for (u64 i = tid; i < n4; i += stride) {
            float4 v = in4[i];
            uint2 r;
            r.x = bf16x2_pack_rne(v.x, v.y);
            r.y = bf16x2_pack_rne(v.z, v.w);
            out4[i] = r;
        }
        for (u64 i = n4 * 4 + tid; i < n; i += stride) {
            out[i] = f32_to_bf16_rne(in[i]);
        }
    } else {
        for (u64 i = tid; i < n; i += stride) {
            out[i] = f32_to_bf16_rne(in[i]);
        }
    }
}

// A row-major (rows, cols) f32 matrix into bf16 rows of stride ld_out >= cols, the padding
// columns zeroed. Tensor-core GEMMs want every leading dimension (and m, n, k themselves) a
// multiple of 8 elements: GPT-2's vocabulary (50,257) and BERT's (30,522) are not, and cuBLAS
// then falls off its fast kernels (measured: 47 TFLOP/s for the LM head, bench/NOTES.md).
// Zero padding lets a GEMM run over the rounded-up size: padded products add zeros.
extern "C" __global__ void f32_to_bf16_rows(unsigned short* out, const float* in, u64 rows, u64 cols, u64 ld_out) {
    const u64 total = rows * ld_out;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 r = i / ld_out, c = i - r * ld_out;
        out[i] = c < cols ? f32_to_bf16_rne(in[r * cols + c]) : (unsigned short)0;
    }
}

// The same for a bf16 matrix (an activation buffer): copied into rows of stride ld_out, padding
// zeroed.
extern "C" __global__ void bf16_rows_repack(unsigned short* out, const unsigned short* in, u64 rows, u64 cols,
                                            u64 ld_out) {
    const u64 total = rows * ld_out;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 r = i / ld_out, c = i - r * ld_out;
        out[i] = c < cols ? in[r * cols + c] : (unsigned short)0;
    }
}

// out (rows, cols) += padded (rows, ld_in) [:, :cols]: a weight gradient computed over a
// rounded-up dimension into a scratch, added into the caller's gradient.
extern "C" __global__ void add_unpadded(float* out, const float* padded, u64 rows, u64 cols, u64 ld_in) {
    const u64 total = rows * cols;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 r = i / cols, c = i - r * cols;
        out[i] += padded[r * ld_in + c];
    }
}

// out (rows, cols) = padded (rows, ld_in) [:, :cols] + bias (cols) (bias may be null): the result
// of a GEMM written with a padded leading dimension, moved into the caller's dense buffer.
extern "C" __global__ void unpad_rows_add_bias(float* out, const float* padded, const float* bias, u64 rows, u64 cols,
                                               u64 ld_in) {
    const u64 total = rows * cols;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 r = i / cols, c = i - r * cols;
        float v = padded[r * ld_in + c];
        out[i] = bias ? v + bias[c] : v;
    }
}

// As unpad_rows_add_bias, into a bf16 buffer: the GEMM's f32 result (plus the f32 bias) is rounded
// once, as cuBLAS's own bf16 output would be.
extern "C" __global__ void unpad_rows_add_bias_bf16(unsigned short* out, const float* padded, const float* bias,
                                                    u64 rows, u64 cols, u64 ld_in) {
    const u64 total = rows * cols;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 r = i / cols, c = i - r * cols;
        float v = padded[r * ld_in + c];
        out[i] = f32_to_bf16_rne(bias ? v + bias[c] : v);
    }
}

// out[i] += in[i] (bf16): a bias gradient that a cuBLASLt epilogue wrote in its GEMM's output
// type (DGELU_BGRAD with a bf16 D), added onto the f32 gradient buffer.
extern "C" __global__ void add_bf16_onto_f32(float* out, const unsigned short* in, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] += bf16_to_f32(in[i]);
    }
}
