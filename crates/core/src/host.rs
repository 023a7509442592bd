//! Host interop through `ndarray`.

use crate::backend::Backend;
use crate::dtype::Element;
use crate::error::{MoeError, Result};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

/// Uploads an array (any layout; non-contiguous views are copied first).
pub fn upload_array<B: Backend + ?Sized, T: Element>(backend: &B, view: ArrayViewD<'_, T>) -> Result<B::Buffer> {
    match view.as_slice() {
        Some(s) => backend.upload(T::host_slice(s)),
        None => {
            let owned: Vec<T> = view.iter().copied().collect();
            backend.upload(T::host_slice(&owned))
        }
    }
}

/// Downloads the first `shape.product()` elements of `buf` as an array of `T`.
pub fn download_array<B: Backend + ?Sized, T: Element>(
    backend: &B,
    buf: &B::Buffer,
    shape: &[usize],
) -> Result<ArrayD<T>> {
    let n = crate::backend::checked_product("download shape", shape)?;
    // Only what the shape takes where the buffer holds it (a longer one's tail is not copied).
    let host = if n <= crate::DeviceBuffer::len(buf) {
        backend.download_prefix(buf, n)?
    } else {
        backend.download(buf)?
    };
    let got = host.dtype();
    let mut v = T::from_host(host).ok_or_else(|| MoeError::DType {
        what: "downloaded buffer".into(),
        got,
        expected: T::DTYPE.to_string(),
    })?;
    if v.len() < n {
        return Err(MoeError::shape(
            "downloaded buffer length",
            v.len(),
            format!("at least {n} for shape {shape:?}"),
        ));
    }
    v.truncate(n);
    ArrayD::from_shape_vec(IxDyn(shape), v)
        .map_err(|e| MoeError::shape("array shape", format!("{shape:?}"), e.to_string()))
}
