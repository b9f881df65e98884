// A POSIX ustar archive written as it streams: an HTTP export is one response whatever the
// number of files, and `tar x` reads it. Sizes past 8 GiB use GNU's base-256 size field.
#pragma once
#include <cstdint>
#include <string>

namespace amoeba {

// The 512-byte header of a regular file `name` (at most 100 bytes) of `size` bytes.
std::string TarHeader(const std::string& name, uint64_t size, int64_t mtime);
// Zero bytes that pad `size` bytes of file data to a 512-byte block.
std::string TarPadding(uint64_t size);
// The two zero blocks that end an archive.
std::string TarEnd();

}  // namespace amoeba
