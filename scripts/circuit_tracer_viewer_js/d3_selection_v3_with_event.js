// d3-jetpack 2.3.0's attachTooltip imports d3-selection 1's `event`, which d3-selection 3
// no longer exports (handlers get the event as an argument); the viewer's tooltips need
// neither, so it is undefined here.
export * from "../node_modules/d3-selection/src/index.js";
export const event = undefined;
