export declare const PREBUILT_SCOPE: string;
export declare const PREBUILT_VARIANTS: { suffix: string; backends: string[] }[];
export declare const PREBUILT_PLATFORMS: Record<string, { os: string[]; cpu: string[]; libc: string[] }>;
export declare function currentPlatform(): { key: string; unsupported?: string };
export declare function prebuiltPackageNames(): string[];
export declare function prebuiltAddonPath(name: string, packageRoot: string): string | undefined;
