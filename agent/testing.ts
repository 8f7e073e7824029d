/**
 * Test support: the image every agent test runs (debian-slim: Debian 12 minbase plus python3),
 * built once into a cache that survives between runs (STRATA_TEST_IMAGE_CACHE, default
 * /var/cache/strata-test-images), so only the first run on a machine pays for debootstrap.
 */
import { ImageBuilder, type BuiltImage } from "./image.js";

/** The cache directory test images are built into. */
export const TEST_IMAGE_CACHE = process.env.STRATA_TEST_IMAGE_CACHE ?? "/var/cache/strata-test-images";

let base: Promise<BuiltImage> | undefined;

/** The shared debian-slim test image, built on first use. */
export function testImage(): Promise<BuiltImage> {
  base ??= new ImageBuilder({ cacheDir: TEST_IMAGE_CACHE }).build({ base: { kind: "debian-slim" }, steps: [] });
  return base;
}
