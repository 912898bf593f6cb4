// The theme leaves the colour mode empty on a reader's first visit and then
// logs "Got invalid theme mode" to the console; "auto" follows the system.
if (!document.documentElement.dataset.mode) {
  document.documentElement.dataset.mode = "auto";
}
