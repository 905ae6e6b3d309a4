//! Bytes from numpy seen as slices of an element type: `typed` and `with_typed_mut`
//! (through an aligned copy when the array's bytes are not aligned for it), and
//! `by_width!`, which picks the unsigned integer of an element's width for steps that
//! only move bits (dispatch, combine, materialize).

use bytemuck::Pod;

/// Runs `$body` with `$t` bound to the unsigned integer of `$size` bytes.
macro_rules! by_width {
    ($size:expr, $t:ident => $body:expr) => {
        match $size {
            1 => {
                type $t = u8;
                $body
            }
            2 => {
                type $t = u16;
                $body
            }
            4 => {
                type $t = u32;
                $body
            }
            8 => {
                type $t = u64;
                $body
            }
            other => Err(phalanx::Error::InvalidArgument(format!("no element type is {other} bytes wide"))),
        }
    };
}
pub(crate) use by_width;

/// `bytes` as a slice of `T`, copied when they are not aligned for `T`.
pub(crate) fn typed<T: Pod>(bytes: &[u8]) -> std::borrow::Cow<'_, [T]> {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(t) => std::borrow::Cow::Borrowed(t),
        Err(_) => std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}

/// Runs `f` on `bytes` as a slice of `T`; when they are not aligned for `T`, on an
/// aligned copy written back only if `f` succeeds (an error leaves `bytes` as they were).
pub(crate) fn with_typed_mut<T: Pod>(
    bytes: &mut [u8],
    f: impl FnOnce(&mut [T]) -> phalanx::Result<()>,
) -> phalanx::Result<()> {
    let aligned = (bytes.as_ptr() as usize) % std::mem::align_of::<T>() == 0;
    if aligned && bytes.len() % std::mem::size_of::<T>() == 0 {
        return f(bytemuck::cast_slice_mut(bytes));
    }
    let mut copy: Vec<T> = bytemuck::pod_collect_to_vec(bytes);
    f(&mut copy)?;
    bytes.copy_from_slice(bytemuck::cast_slice(&copy));
    Ok(())
}
