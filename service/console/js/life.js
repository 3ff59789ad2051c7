// A view's lifetime: timers and in-flight work stop drawing once the route changes.
//
// const life = lifetime(); life.every(fn, ms) runs async fn now and then ms after each run ends
// (never two at once) until life.stop(); life.alive says whether the view is still shown.

export function lifetime() {
  const timers = new Set();
  const life = {
    alive: true,
    every(fn, ms) {
      const tick = async () => {
        if (!life.alive) return;
        let again = true;
        try {
          again = (await fn()) !== false;
        } catch (e) {
          console.warn("refresh failed:", e && e.message);
        }
        if (life.alive && again) timers.add(setTimeout(tick, ms));
      };
      tick();
    },
    stop() {
      life.alive = false;
      for (const t of timers) clearTimeout(t);
      timers.clear();
    },
  };
  return life;
}
