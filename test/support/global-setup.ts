/** Placeholder: replaced by the RGW-starting global setup. */
export default async function setup(): Promise<void> {}
