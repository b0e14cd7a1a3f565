/* Test-only: GNUstep's headers include this when the compiler has blocks. Debian's GCC runtime
 * ships no blocks runtime; the clang syntax check of the bridge's block code needs none. */
