//! xxh3-64 read straight from block memory: no page copy, one pass over the bytes.
//!
//! This is xxh3-64 with seed 0 and the default secret (bit for bit what
//! `xxhash_rust::xxh3::xxh3_64` returns for the same bytes, which the tests check), restricted to
//! what block memory offers: input made of runs that start 32-byte aligned and whose lengths are
//! multiples of the 64-byte stripe, more than 240 bytes in all (the "long" form of xxh3). Pages
//! satisfy that (page sizes are powers of two of at least 512 bytes, mappings are page aligned).
//! Anything else is hashed through a private copy by the caller.
//!
//! Reads follow the module's rules: every load of block memory is a `read_volatile` of an
//! aligned 32-, 16- or 8-byte value into a register, never a reference. The SIMD width is chosen
//! at run time (`is_x86_feature_detected!`), because the `xxhash-rust` crate selects its kernel
//! with `cfg(target_feature)` at compile time, which leaves a default x86-64 build on SSE2 with
//! a scalar scramble whatever the CPU offers.

/// Bytes per stripe: one accumulate step.
const STRIPE: usize = 64;
/// Stripes per block, between two scrambles: (secret size - stripe) / 8.
const STRIPES_PER_BLOCK: usize = 16;
/// Inputs up to this length use xxh3's short forms, which this module does not implement.
const MID_SIZE_MAX: usize = 240;

const PRIME32_1: u64 = 0x9E37_79B1;
const PRIME32_2: u64 = 0x85EB_CA77;
const PRIME32_3: u64 = 0xC2B2_AE3D;
const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;

const INITIAL_ACC: [u64; 8] = [PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1];

/// xxh3's default secret.
const SECRET: [u8; 192] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c, 0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb,
    0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f, 0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c, 0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb,
    0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3, 0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d, 0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31,
    0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64, 0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e, 0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc,
    0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce, 0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
];

/// True when runs of this shape can be hashed in place (see the module documentation).
pub(super) fn fits(ptr: *const u8, len: usize) -> bool {
    (ptr as usize).is_multiple_of(32) && len.is_multiple_of(STRIPE)
}

/// xxh3-64 of the concatenation of `runs` (`(pointer, length)`), `total` bytes in all.
///
/// # Safety
/// Every run must satisfy [`fits`] and be readable for its length during the call (a checked
/// range of a live mapping); `total` is the sum of the lengths and exceeds [`MID_SIZE_MAX`].
pub(super) unsafe fn digest(runs: &[(*const u8, usize)], total: usize) -> u64 {
    debug_assert!(total > MID_SIZE_MAX && runs.iter().map(|r| r.1).sum::<usize>() == total);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2; the runs are the caller's promise.
            return unsafe { x86::digest_avx2(runs, total) };
        }
        // SAFETY: SSE2 is part of x86-64; the runs are the caller's promise.
        unsafe { x86::digest_sse2(runs, total) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: forwarded from the caller.
    unsafe {
        long::<Scalar>(runs, total)
    }
}

/// True when pages of `page` bytes can be hashed with [`digest_pages`]: a page is whole 16-stripe
/// blocks, so a stripe sits at the same place within its block in the page as in the packet.
pub(super) fn fits_pages(page: usize) -> bool {
    page.is_multiple_of(STRIPE * STRIPES_PER_BLOCK)
}

/// One pass over `pages` (each `page` bytes): returns the xxh3-64 of their concatenation and
/// writes each page's own xxh3-64 to `out` (same length as `pages`).
///
/// Within a page the two hashes see the same stripes with the same secret (a page is whole
/// blocks, [`fits_pages`]), so each stripe is loaded and multiplied once and added to both
/// accumulators; they differ only at a page's last stripe (the page's closing stripe uses the
/// secret at 121, the concatenation goes on with the block's last key and a scramble).
///
/// # Safety
/// Every page must satisfy [`fits`] and be readable for `page` bytes during the call (a checked
/// range of a live mapping); `page` satisfies [`fits_pages`]; `pages` is not empty.
pub(super) unsafe fn digest_pages(pages: &[*const u8], page: usize, out: &mut [u64]) -> u64 {
    debug_assert!(fits_pages(page) && !pages.is_empty() && out.len() == pages.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2; the pages are the caller's promise.
            return unsafe { x86::digest_pages_avx2(pages, page, out) };
        }
        // SAFETY: SSE2 is part of x86-64; the pages are the caller's promise.
        unsafe { x86::digest_pages_sse2(pages, page, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: forwarded from the caller.
    unsafe {
        long_pages::<Scalar>(pages, page, out)
    }
}

/// One accumulate and one scramble step over the eight 64-bit lanes.
trait Kernel {
    /// Accumulates the 64-byte stripe at `stripe` (32-byte aligned block memory) with the
    /// secret's 64 bytes at `secret`.
    unsafe fn accumulate(acc: &mut [u64; 8], stripe: *const u8, secret: &[u8]);
    /// As [`Kernel::accumulate`], adding the stripe's one contribution to two sets of lanes.
    unsafe fn accumulate2(acc: &mut [u64; 8], other: &mut [u64; 8], stripe: *const u8, secret: &[u8]);
    /// Scrambles the lanes with the secret's last 64 bytes.
    unsafe fn scramble(acc: &mut [u64; 8]);
}

/// Where the input's last stripe takes its secret.
const LAST_SECRET: usize = 192 - STRIPE - 7;

/// xxh3's long hash, stripe by stripe across the runs: every stripe but the last is accumulated
/// with the secret at 8 times its index within a 16-stripe block, each full block is followed by
/// a scramble, and the input's last stripe is accumulated with the secret at 121; then the lanes
/// are merged with the length.
#[inline(always)]
unsafe fn long<K: Kernel>(runs: &[(*const u8, usize)], total: usize) -> u64 {
    let mut acc = INITIAL_ACC;
    let last = total / STRIPE - 1;
    let mut i = 0;
    let mut tail = std::ptr::null();
    for &(ptr, len) in runs {
        for s in 0..len / STRIPE {
            let stripe = ptr.wrapping_add(s * STRIPE);
            if i == last {
                tail = stripe;
                break;
            }
            let k = i % STRIPES_PER_BLOCK;
            // SAFETY: the stripe lies in a run the caller vouches for.
            unsafe { K::accumulate(&mut acc, stripe, &SECRET[k * 8..k * 8 + STRIPE]) };
            if k == STRIPES_PER_BLOCK - 1 {
                // SAFETY: no memory access beyond `acc`.
                unsafe { K::scramble(&mut acc) };
            }
            i += 1;
        }
    }
    // SAFETY: `tail` is the input's last stripe (found above, since the lengths add to `total`).
    unsafe { K::accumulate(&mut acc, tail, &SECRET[LAST_SECRET..LAST_SECRET + STRIPE]) };
    merge(&acc, total as u64)
}

/// [`long`] over whole pages, each page's own long hash taken alongside (see [`digest_pages`]).
#[inline(always)]
unsafe fn long_pages<K: Kernel>(pages: &[*const u8], page: usize, out: &mut [u64]) -> u64 {
    let stripes = page / STRIPE;
    let mut acc = INITIAL_ACC;
    for (k, &p) in pages.iter().enumerate() {
        let mut own = INITIAL_ACC;
        for s in 0..stripes - 1 {
            let j = s % STRIPES_PER_BLOCK;
            // SAFETY: the stripe lies in a page the caller vouches for.
            unsafe { K::accumulate2(&mut acc, &mut own, p.wrapping_add(s * STRIPE), &SECRET[j * 8..j * 8 + STRIPE]) };
            if j == STRIPES_PER_BLOCK - 1 {
                // SAFETY: no memory access beyond the lanes.
                unsafe {
                    K::scramble(&mut acc);
                    K::scramble(&mut own);
                }
            }
        }
        let tail = p.wrapping_add((stripes - 1) * STRIPE);
        // SAFETY: the page's last stripe, as above.
        unsafe { K::accumulate(&mut own, tail, &SECRET[LAST_SECRET..LAST_SECRET + STRIPE]) };
        out[k] = merge(&own, page as u64);
        if k + 1 == pages.len() {
            // SAFETY: as above; the input's last stripe.
            unsafe { K::accumulate(&mut acc, tail, &SECRET[LAST_SECRET..LAST_SECRET + STRIPE]) };
        } else {
            let j = STRIPES_PER_BLOCK - 1;
            // SAFETY: as above; a block's last stripe, then its scramble.
            unsafe {
                K::accumulate(&mut acc, tail, &SECRET[j * 8..j * 8 + STRIPE]);
                K::scramble(&mut acc);
            }
        }
    }
    merge(&acc, (page * pages.len()) as u64)
}

fn secret_word(at: usize) -> u64 {
    u64::from_le_bytes(SECRET[at..at + 8].try_into().expect("8 bytes"))
}

fn merge(acc: &[u64; 8], len: u64) -> u64 {
    let mut h = len.wrapping_mul(PRIME64_1);
    for j in 0..4 {
        let a = acc[2 * j] ^ secret_word(11 + 16 * j);
        let b = acc[2 * j + 1] ^ secret_word(11 + 16 * j + 8);
        let p = u128::from(a) * u128::from(b);
        h = h.wrapping_add((p as u64) ^ ((p >> 64) as u64));
    }
    h ^= h >> 37;
    h = h.wrapping_mul(0x1656_6791_9E37_79F9);
    h ^ (h >> 32)
}

/// Plain 64-bit lanes: the reference the SIMD kernels match, and the kernel off x86-64.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
struct Scalar;

impl Kernel for Scalar {
    unsafe fn accumulate(acc: &mut [u64; 8], stripe: *const u8, secret: &[u8]) {
        for (i, key) in secret.chunks_exact(8).enumerate() {
            // SAFETY: the caller's stripe is 32-byte aligned and 64 bytes long.
            let data = u64::from_le(unsafe { std::ptr::read_volatile(stripe.cast::<u64>().add(i)) });
            let dk = data ^ u64::from_le_bytes(key.try_into().expect("8 bytes"));
            acc[i ^ 1] = acc[i ^ 1].wrapping_add(data);
            acc[i] = acc[i].wrapping_add((dk & 0xffff_ffff) * (dk >> 32));
        }
    }

    unsafe fn accumulate2(acc: &mut [u64; 8], other: &mut [u64; 8], stripe: *const u8, secret: &[u8]) {
        for (i, key) in secret.chunks_exact(8).enumerate() {
            // SAFETY: as in `accumulate`.
            let data = u64::from_le(unsafe { std::ptr::read_volatile(stripe.cast::<u64>().add(i)) });
            let dk = data ^ u64::from_le_bytes(key.try_into().expect("8 bytes"));
            let product = (dk & 0xffff_ffff) * (dk >> 32);
            for a in [&mut *acc, &mut *other] {
                a[i ^ 1] = a[i ^ 1].wrapping_add(data);
                a[i] = a[i].wrapping_add(product);
            }
        }
    }

    unsafe fn scramble(acc: &mut [u64; 8]) {
        for (i, a) in acc.iter_mut().enumerate() {
            let v = (*a ^ (*a >> 47)) ^ secret_word(192 - STRIPE + 8 * i);
            *a = v.wrapping_mul(PRIME32_1);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Kernel, PRIME32_1, SECRET, STRIPE, long, long_pages};

    pub(super) struct Sse2;
    pub(super) struct Avx2;

    impl Kernel for Sse2 {
        #[inline(always)]
        unsafe fn accumulate(acc: &mut [u64; 8], stripe: *const u8, secret: &[u8]) {
            let a = acc.as_mut_ptr().cast::<__m128i>();
            for i in 0..4 {
                // SAFETY: 16-byte aligned loads inside the caller's stripe; the secret slice is
                // 64 bytes; `acc` holds four unaligned 16-byte lanes.
                unsafe {
                    let data = std::ptr::read_volatile(stripe.cast::<__m128i>().add(i));
                    let key = _mm_loadu_si128(secret.as_ptr().cast::<__m128i>().add(i));
                    let dk = _mm_xor_si128(data, key);
                    let product = _mm_mul_epu32(dk, _mm_shuffle_epi32::<0b00_11_00_01>(dk));
                    let sum = _mm_add_epi64(_mm_loadu_si128(a.add(i)), _mm_shuffle_epi32::<0b01_00_11_10>(data));
                    _mm_storeu_si128(a.add(i), _mm_add_epi64(product, sum));
                }
            }
        }

        #[inline(always)]
        unsafe fn accumulate2(acc: &mut [u64; 8], other: &mut [u64; 8], stripe: *const u8, secret: &[u8]) {
            let (a, b) = (acc.as_mut_ptr().cast::<__m128i>(), other.as_mut_ptr().cast::<__m128i>());
            for i in 0..4 {
                // SAFETY: as in `accumulate`; `other` is four more unaligned lanes.
                unsafe {
                    let data = std::ptr::read_volatile(stripe.cast::<__m128i>().add(i));
                    let key = _mm_loadu_si128(secret.as_ptr().cast::<__m128i>().add(i));
                    let dk = _mm_xor_si128(data, key);
                    let add = _mm_add_epi64(_mm_mul_epu32(dk, _mm_shuffle_epi32::<0b00_11_00_01>(dk)), _mm_shuffle_epi32::<0b01_00_11_10>(data));
                    _mm_storeu_si128(a.add(i), _mm_add_epi64(_mm_loadu_si128(a.add(i)), add));
                    _mm_storeu_si128(b.add(i), _mm_add_epi64(_mm_loadu_si128(b.add(i)), add));
                }
            }
        }

        #[inline(always)]
        unsafe fn scramble(acc: &mut [u64; 8]) {
            let a = acc.as_mut_ptr().cast::<__m128i>();
            for i in 0..4 {
                // SAFETY: private lanes and the secret's last 64 bytes.
                unsafe {
                    let prime = _mm_set1_epi32(PRIME32_1 as i32);
                    let v = _mm_loadu_si128(a.add(i));
                    let v = _mm_xor_si128(v, _mm_srli_epi64::<47>(v));
                    let dk = _mm_xor_si128(v, _mm_loadu_si128(SECRET.as_ptr().add(192 - STRIPE).cast::<__m128i>().add(i)));
                    let lo = _mm_mul_epu32(dk, prime);
                    let hi = _mm_mul_epu32(_mm_srli_epi64::<32>(dk), prime);
                    _mm_storeu_si128(a.add(i), _mm_add_epi64(lo, _mm_slli_epi64::<32>(hi)));
                }
            }
        }
    }

    impl Kernel for Avx2 {
        #[inline(always)]
        unsafe fn accumulate(acc: &mut [u64; 8], stripe: *const u8, secret: &[u8]) {
            let a = acc.as_mut_ptr().cast::<__m256i>();
            for i in 0..2 {
                // SAFETY: 32-byte aligned loads inside the caller's stripe; only reached from
                // `digest_avx2`, which runs on a CPU with AVX2.
                unsafe {
                    let data = std::ptr::read_volatile(stripe.cast::<__m256i>().add(i));
                    let key = _mm256_loadu_si256(secret.as_ptr().cast::<__m256i>().add(i));
                    let dk = _mm256_xor_si256(data, key);
                    let product = _mm256_mul_epu32(dk, _mm256_srli_epi64::<32>(dk));
                    let sum = _mm256_add_epi64(_mm256_loadu_si256(a.add(i)), _mm256_shuffle_epi32::<0b01_00_11_10>(data));
                    _mm256_storeu_si256(a.add(i), _mm256_add_epi64(product, sum));
                }
            }
        }

        #[inline(always)]
        unsafe fn accumulate2(acc: &mut [u64; 8], other: &mut [u64; 8], stripe: *const u8, secret: &[u8]) {
            let (a, b) = (acc.as_mut_ptr().cast::<__m256i>(), other.as_mut_ptr().cast::<__m256i>());
            for i in 0..2 {
                // SAFETY: as in `accumulate`; `other` is two more unaligned lanes.
                unsafe {
                    let data = std::ptr::read_volatile(stripe.cast::<__m256i>().add(i));
                    let key = _mm256_loadu_si256(secret.as_ptr().cast::<__m256i>().add(i));
                    let dk = _mm256_xor_si256(data, key);
                    let add = _mm256_add_epi64(_mm256_mul_epu32(dk, _mm256_srli_epi64::<32>(dk)), _mm256_shuffle_epi32::<0b01_00_11_10>(data));
                    _mm256_storeu_si256(a.add(i), _mm256_add_epi64(_mm256_loadu_si256(a.add(i)), add));
                    _mm256_storeu_si256(b.add(i), _mm256_add_epi64(_mm256_loadu_si256(b.add(i)), add));
                }
            }
        }

        #[inline(always)]
        unsafe fn scramble(acc: &mut [u64; 8]) {
            let a = acc.as_mut_ptr().cast::<__m256i>();
            for i in 0..2 {
                // SAFETY: private lanes and the secret's last 64 bytes; AVX2 as above.
                unsafe {
                    let prime = _mm256_set1_epi32(PRIME32_1 as i32);
                    let v = _mm256_loadu_si256(a.add(i));
                    let v = _mm256_xor_si256(v, _mm256_srli_epi64::<47>(v));
                    let dk = _mm256_xor_si256(v, _mm256_loadu_si256(SECRET.as_ptr().add(192 - STRIPE).cast::<__m256i>().add(i)));
                    let lo = _mm256_mul_epu32(dk, prime);
                    let hi = _mm256_mul_epu32(_mm256_srli_epi64::<32>(dk), prime);
                    _mm256_storeu_si256(a.add(i), _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(hi)));
                }
            }
        }
    }

    /// # Safety
    /// As [`super::digest`].
    pub(super) unsafe fn digest_sse2(runs: &[(*const u8, usize)], total: usize) -> u64 {
        // SAFETY: forwarded.
        unsafe { long::<Sse2>(runs, total) }
    }

    /// # Safety
    /// As [`super::digest`], on a CPU with AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn digest_avx2(runs: &[(*const u8, usize)], total: usize) -> u64 {
        // SAFETY: forwarded.
        unsafe { long::<Avx2>(runs, total) }
    }

    /// # Safety
    /// As [`super::digest_pages`].
    pub(super) unsafe fn digest_pages_sse2(pages: &[*const u8], page: usize, out: &mut [u64]) -> u64 {
        // SAFETY: forwarded.
        unsafe { long_pages::<Sse2>(pages, page, out) }
    }

    /// # Safety
    /// As [`super::digest_pages`], on a CPU with AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn digest_pages_avx2(pages: &[*const u8], page: usize, out: &mut [u64]) -> u64 {
        // SAFETY: forwarded.
        unsafe { long_pages::<Avx2>(pages, page, out) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Mapping;

    /// 64 KiB of xorshift bytes from `seed`, in a mapping and in a Vec.
    fn random_mapping(mut x: u64) -> (Mapping, Vec<u8>) {
        let m = Mapping::anonymous(64 * 1024, false).unwrap();
        let mut bytes = vec![0u8; m.len()];
        for b in &mut bytes {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        m.copy_from(0, &bytes);
        (m, bytes)
    }

    /// Every kernel equals the crate's xxh3-64 over the same bytes, across block boundaries,
    /// run splits and the last-stripe cases.
    #[test]
    fn kernels_match_the_crate() {
        let (m, bytes) = random_mapping(0x1234_5678_9abc_def0);
        let p = m.as_ptr().cast_const();
        for total in [256usize, 512, 960, 1024, 1088, 2048, 4096, 4160, 12288, 65536] {
            let want = xxhash_rust::xxh3::xxh3_64(&bytes[..total]);
            for split in [total, 64 * (total / 128), 64] {
                let runs: Vec<(*const u8, usize)> = if split == total { vec![(p, total)] } else { vec![(p, split), (p.wrapping_add(split), total - split)] };
                // SAFETY: runs inside the mapping, 32-byte aligned, lengths multiples of 64.
                unsafe {
                    assert_eq!(long::<Scalar>(&runs, total), want, "scalar {total} split {split}");
                    assert_eq!(digest(&runs, total), want, "dispatched {total} split {split}");
                    #[cfg(target_arch = "x86_64")]
                    {
                        assert_eq!(x86::digest_sse2(&runs, total), want, "sse2 {total} split {split}");
                        if std::arch::is_x86_feature_detected!("avx2") {
                            assert_eq!(x86::digest_avx2(&runs, total), want, "avx2 {total} split {split}");
                        }
                    }
                }
            }
        }
    }

    /// One pass gives the crate's xxh3-64 of the concatenation and of every page, for each
    /// kernel, page sizes of one and more blocks, one page and many, in any order.
    #[test]
    fn page_kernels_match_the_crate() {
        let (m, bytes) = random_mapping(0x0bad_cafe_f00d_d00d);
        let p = m.as_ptr().cast_const();
        for page in [1024usize, 4096, 8192] {
            let n = bytes.len() / page;
            for order in [vec![0], vec![1, 0], (0..n).collect(), (0..n).rev().step_by(2).collect::<Vec<_>>()] {
                let pages: Vec<*const u8> = order.iter().map(|&i| p.wrapping_add(i * page)).collect();
                let concat: Vec<u8> = order.iter().flat_map(|&i| bytes[i * page..(i + 1) * page].iter().copied()).collect();
                let want = xxhash_rust::xxh3::xxh3_64(&concat);
                let want_pages: Vec<u64> = order.iter().map(|&i| xxhash_rust::xxh3::xxh3_64(&bytes[i * page..(i + 1) * page])).collect();
                let mut out = vec![0u64; pages.len()];
                // SAFETY: pages inside the mapping, page aligned, whole 16-stripe blocks.
                unsafe {
                    assert_eq!(long_pages::<Scalar>(&pages, page, &mut out), want, "scalar {page} {order:?}");
                    assert_eq!(out, want_pages);
                    assert_eq!(digest_pages(&pages, page, &mut out), want, "dispatched {page} {order:?}");
                    assert_eq!(out, want_pages);
                    #[cfg(target_arch = "x86_64")]
                    {
                        assert_eq!(x86::digest_pages_sse2(&pages, page, &mut out), want, "sse2 {page}");
                        assert_eq!(out, want_pages);
                        if std::arch::is_x86_feature_detected!("avx2") {
                            assert_eq!(x86::digest_pages_avx2(&pages, page, &mut out), want, "avx2 {page}");
                            assert_eq!(out, want_pages);
                        }
                    }
                }
            }
        }
    }
}
