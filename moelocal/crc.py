"""CRC32 with zlib's polynomial, the checksum of a converted model's files: Intel ISA-L's (the isal
package; 35 GB/s a core here, 7x zlib's, which held the experts' preload to 60-77% of the disk's
rate on 2 cores), or zlib's where isal cannot be installed. The same numbers either way."""

try:
    from isal.isal_zlib import crc32
except ImportError:  # a platform without isal's wheels
    from zlib import crc32

__all__ = ["crc32"]
