//! Byte buffers from C seen as slices of an element type: `typed` and `with_typed_mut`
//! (through an aligned copy when C's bytes are not aligned for it), and `by_width!`,
//! which picks the unsigned integer of an element's width for steps that only move
//! bits (dispatch, combine, materialize).

use bytemuck::Pod;

use crate::status::Fail;

pub(crate) use phalanx::by_width;

pub(crate) use phalanx::dtype::typed;

/// [`phalanx::dtype::with_typed_mut`] with the C face's error.
pub(crate) fn with_typed_mut<T: Pod>(
    bytes: &mut [u8],
    f: impl FnOnce(&mut [T]) -> phalanx::Result<()>,
) -> Result<(), Fail> {
    Ok(phalanx::dtype::with_typed_mut(bytes, f)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes at an odd address are viewed through an aligned copy, written back only
    /// on success.
    #[test]
    fn unaligned_buffers_go_through_a_copy() {
        let mut store = [0u32; 3];
        // One byte past a 4-aligned address: never aligned for f32.
        let odd = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut store)[1..9];
        odd.copy_from_slice(bytemuck::cast_slice(&[1.5f32, -2.0]));
        assert_eq!(typed::<f32>(odd).to_vec(), vec![1.5, -2.0]);
        with_typed_mut::<f32>(odd, |v| {
            v[1] = 7.0;
            Ok(())
        })
        .ok()
        .expect("no error");
        assert_eq!(typed::<f32>(odd).to_vec(), vec![1.5, 7.0]);
        let err = with_typed_mut::<f32>(odd, |v| {
            v[0] = 9.0;
            Err(phalanx::Error::InvalidArgument("refused".into()))
        });
        assert_eq!(err.err().map(|f| f.code), Some(crate::status::PHX_ERR_INVALID_ARGUMENT));
        assert_eq!(typed::<f32>(odd).to_vec(), vec![1.5, 7.0], "unchanged after an error");
    }
}
